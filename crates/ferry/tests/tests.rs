//! Integration tests: the real `ferry` binary against real servers on
//! 127.0.0.1 with ephemeral ports, one integration binary (ripgrep style).

// Running the binary under deadlines, the server fixture, tree builder and comparer.
mod util;
// Trees and files moved up, down and across, compared byte for byte, mode for mode.
mod transfer;
// Every failure exits non-zero quickly, with one clear line and no panic.
mod errors;
// Where each side of `ferry cp` is: HOST:PATH, [IPV6]:PATH, ferry:// URLs; ambiguous forms refused.
mod forms;
// What the copy is called, for upload, download and cp alike: into an existing directory, `/`, `/.`.
mod placement;
// The server process: address, logs, signals, and peers that are not ferry.
mod server;
// Parallel connections: trees and large files arrive whole with 1 to 8 streams.
mod streams;
// A fault-injecting TCP proxy (cut, stall, flip at exact byte positions) and its self-tests.
mod proxy;
// Retry and resume under fault injection: cuts, stalls, kills, bit flips.
mod resume;
// A source that changes while it is sent: rewritten files, vanished entries.
mod changing;
// --include, --exclude, --exclude-from and --gitignore, both ways.
mod filters;
// --delete: the destination made equal to the source, held back after failures, never via symlinks.
mod mirror;
// --dry-run and --itemize: nothing changes, and what is said is what the real run does.
mod dry_run;
// --atomic and rollback: switched whole, the previous version kept, readers never see a mix.
mod atomic;
// --checksum and `ferry check`: content, not size and mtime.
mod checksum;
// `ferry ls`: a remote tree listed, nothing written here.
mod ls;
// `ferry backup`, --link-dest, --append-only: snapshots that cost what changed, restored exactly.
mod backup;
// Delta transfer: a changed file crosses as its differences, both ways, against snapshots and live trees.
mod delta;
// Confinement: planted, in-transfer and swapped-in symlinks never lead outside a root.
mod confinement;
// Part files, journals and working names: never adopted, opened or removed unless the server's own.
mod hostile_parts;
// Which side failed and where: the server's failures under its paths, counts that add up.
mod sides;
// Progress: no total shown before it is known, counters that never go back.
mod progress;
// Read-only and write-only servers, and idle connections that must not lock clients out.
mod access;
mod tls;
// Owners: kept by a root receiver, both ways; --no-owner; non-root receivers.
mod owners;
// Token authentication: challenge and response, never the token on the wire.
mod auth;
// The server as a service: a configuration file with a root and mode per token, SIGHUP, no home.
mod service;
// Budgets: descriptors, memory, slots and time that hostile clients cannot take from the others.
mod budgets;
// The command line: usage errors, the exit status table, completions and the man page.
mod command_line;
// The source's shape: no function over 80 lines, no import cycle between modules.
mod structure;
