#!/usr/bin/env python3
"""Compare ferry with the tools people use today, on this machine, in one run.

    python3 bench/run.py            # full run (~3 GB of data sets in tmpfs)
    python3 bench/run.py --quick    # smoke test: tiny data sets, one run

Peers: a raw socat pipe, tar|socat, the rsync daemon (plain and -z) and scp,
each driven as a user would. Every run empties the destination, times from
the start of the client (or sender) until the receiving side is done, checks
the copy against the source, and records peak RSS. Runs are interleaved
(run 1 of every tool on every data set, then run 2, ...) so that all tools
see the same machine conditions, and the report shows medians.

A 1 Gbit/s case runs the server and the client in two network namespaces
joined by a veth pair shaped with tc tbf (netem is not available on these
kernels).

The re-sync cases (issue 16) time `ferry up --delete` and `rsync -a --delete`
bringing a copy of the Python tree up to date: unchanged, and with 1% of its
files changed and 1% deleted. Their destination is restored to the previous
version before every run instead of emptied.

Python 3 standard library only; needs root (apt, network namespaces, sshd).
See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
GiB = 1024 * MiB

# Hard cap on any single command, so a wedged peer cannot hang the run.
DEFAULT_TIMEOUT = 600.0
# How long a server gets to start listening.
SERVER_START_TIMEOUT = 15.0

NS_CLIENT = "ferrybench-a"
NS_SERVER = "ferrybench-b"
VETH_CLIENT = "fbveth-a"
VETH_SERVER = "fbveth-b"
IP_CLIENT = "10.77.0.1"
IP_SERVER = "10.77.0.2"


def log(msg: str) -> None:
    """Progress goes to stderr so stdout carries only the report."""
    print(msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    """A problem that stops the whole benchmark, with a message for the user."""


class RunFailed(Exception):
    """One run of one tool failed; the tool is marked FAILED, the bench goes on."""


# ---------------------------------------------------------------------------
# Processes: every child in its own process group, reaped with wait4 so its
# peak RSS comes with its exit status, and killed as a group on timeout.
# ---------------------------------------------------------------------------

_live: set["Proc"] = set()  # every process not yet reaped, killed at exit


GNU_TIME = "/usr/bin/time"


class Proc:
    """A child process whose exit time is caught the moment it ends.

    With `measure_rss`, the command runs under GNU time, which reports the
    command's own peak RSS. wait4's ru_maxrss cannot be used from here: a
    child forked from Python keeps Python's peak RSS across exec, so every
    tool would show at least the interpreter's ~40 MiB.
    """

    def __init__(self, argv: list[str], log_path: Path, *, measure_rss: bool = False):
        self.argv = argv
        self.log_path = log_path
        self.end: float | None = None
        self.status: int | None = None
        self.rss_file = log_path.with_suffix(".rss") if measure_rss else None
        if self.rss_file:
            self.rss_file.unlink(missing_ok=True)
            argv = [GNU_TIME, "-f", "%M", "-o", str(self.rss_file), *argv]
        with open(log_path, "ab") as logf:
            logf.write(f"$ {shlex.join(argv)}\n".encode())
            logf.flush()
            try:
                self.popen = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
                )
            except OSError as e:
                raise RunFailed(f"cannot start {argv[0]}: {e}") from e
        self.pid = self.popen.pid
        _live.add(self)
        self._reaped = threading.Event()
        # A blocking wait4 in a thread records the exit time precisely
        # (polling would add its period to every measurement).
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        _, status, _ = os.wait4(self.pid, 0)
        self.end = time.perf_counter()
        self.status = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.status  # so Popen never waits for it again
        _live.discard(self)
        self._reaped.set()

    def running(self) -> bool:
        return not self._reaped.is_set()

    def wait(self, timeout: float) -> int:
        if not self._reaped.wait(timeout):
            self.kill()
            raise RunFailed(f"timed out after {timeout:.0f} s: {shlex.join(self.argv)}")
        assert self.status is not None
        return self.status

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        self._reaped.wait(10)

    def stop(self) -> None:
        """SIGTERM the group, then SIGKILL what is left after 5 s, including
        children that outlive the leader (an rsync daemon's connection
        handler, sshd's session)."""
        if self.running():
            self.signal_group(signal.SIGTERM)
            if not self._reaped.wait(5):
                self.kill()
        self.signal_group(signal.SIGKILL)

    @property
    def maxrss_kib(self) -> int:
        """Peak RSS of the command as GNU time saw it (0 if not measured)."""
        try:
            return int(self.rss_file.read_text().split()[-1]) if self.rss_file else 0
        except (OSError, ValueError, IndexError):
            return 0

    def vmhwm_kib(self) -> int:
        """Peak resident set size so far, read while the process is alive."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


def kill_all_live() -> None:
    for p in list(_live):
        p.kill()


def run_cmd(argv: list[str], timeout: float = DEFAULT_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    """Run a setup command; raise BenchError with its output when it fails."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out after {timeout:.0f} s: {shlex.join(argv)}") from e
    except OSError as e:
        raise BenchError(f"cannot run {argv[0]}: {e}") from e
    if r.returncode != 0:
        raise BenchError(
            f"`{shlex.join(argv)}` failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()}"
        )
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_listening(pid: int, port: int) -> bool:
    """Whether some socket in `pid`'s network namespace listens on `port`.

    Read from /proc rather than probed with a connection: a probe would use
    up socat's single accept, and /proc/PID/net sees into a namespace.
    """
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def bench_token(workdir: Path) -> Path:
    """The token ferry's server and client share in the bench (0600)."""
    path = workdir / "ferry-token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return path


def start_server(argv: list[str], port: int, log_path: Path) -> Proc:
    """Start a listening process and return once its port is open."""
    p = Proc(argv, log_path)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if not p.running():
            raise RunFailed(f"{argv[0]} exited at start (exit {p.status}): {p.log_tail()}")
        if is_listening(p.pid, port):
            return p
        time.sleep(0.01)
    p.stop()
    raise RunFailed(f"{shlex.join(argv)} did not listen on port {port} within {SERVER_START_TIMEOUT:.0f} s")


# ---------------------------------------------------------------------------
# Network placement: loopback, or two namespaces over a shaped veth pair.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Net:
    name: str
    server_host: str  # where clients connect
    client_prefix: tuple[str, ...] = ()  # argv prefix to run a client
    server_prefix: tuple[str, ...] = ()  # argv prefix to run a server

    def client(self, argv: list[str]) -> list[str]:
        return [*self.client_prefix, *argv]

    def server(self, argv: list[str]) -> list[str]:
        return [*self.server_prefix, *argv]


LOOPBACK = Net("loopback", "127.0.0.1")
LINK = Net(
    "1gbit",
    IP_SERVER,
    ("ip", "netns", "exec", NS_CLIENT),
    ("ip", "netns", "exec", NS_SERVER),
)


def delete_link() -> None:
    # Deleting a namespace also deletes the veth end inside it, and with it
    # the pair.
    for ns in (NS_CLIENT, NS_SERVER):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def create_link() -> None:
    """Two namespaces joined by a veth pair, both ends shaped to 1 Gbit/s."""
    delete_link()  # leftovers of an interrupted run
    steps = [
        ["ip", "netns", "add", NS_CLIENT],
        ["ip", "netns", "add", NS_SERVER],
        ["ip", "link", "add", VETH_CLIENT, "type", "veth", "peer", "name", VETH_SERVER],
        ["ip", "link", "set", VETH_CLIENT, "netns", NS_CLIENT],
        ["ip", "link", "set", VETH_SERVER, "netns", NS_SERVER],
    ]
    for ns, dev, addr in ((NS_CLIENT, VETH_CLIENT, IP_CLIENT), (NS_SERVER, VETH_SERVER, IP_SERVER)):
        ex = ["ip", "netns", "exec", ns]
        steps += [
            ex + ["ip", "addr", "add", f"{addr}/24", "dev", dev],
            ex + ["ip", "link", "set", dev, "up"],
            ex + ["ip", "link", "set", "lo", "up"],
            # Shaping both ends shapes data and acknowledgements alike.
            ex + ["tc", "qdisc", "add", "dev", dev, "root", "tbf",
                  "rate", "1gbit", "burst", "256kb", "latency", "50ms"],
        ]
    for argv in steps:
        run_cmd(argv, timeout=30)
    if shutil.which("ping"):
        run_cmd(LINK.client(["ping", "-c", "1", "-W", "2", IP_SERVER]), timeout=10)


# ---------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------


@dataclass
class Dataset:
    name: str
    kind: str  # "file" or "tree"
    path: Path
    spec: dict  # what it was generated from; a mismatch means regenerate
    net: Net = LOOPBACK
    bytes: int = 0
    files: int = 0
    # A re-sync case: the destination is this tree (copied with `cp -a`,
    # untimed) before every run, and the tools run with --delete.
    old: Path | None = None
    changed: tuple[str, ...] = ()  # relative paths whose content differs from `old`
    deleted: tuple[str, ...] = ()  # relative paths in `old` and not in the source

    @property
    def resync(self) -> bool:
        return self.old is not None


def tree_stats(path: Path) -> tuple[int, int]:
    """(bytes of regular files, number of regular files) below `path`."""
    if path.is_file():
        return path.stat().st_size, 1
    total = count = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(root, f))
            if not os.path.islink(os.path.join(root, f)):
                total += st.st_size
                count += 1
    return total, count


def gen_random_file(path: Path, size: int) -> None:
    block = 8 * MiB
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n


def text_sources() -> list[Path]:
    """Real text found on the machine: the Python stdlib's sources and docs,
    and /usr/share/doc (plain and gzipped), in a fixed order."""
    import sysconfig

    exts = {".py", ".txt", ".rst", ".html", ".htm", ".css", ".js", ".json", ".xml",
            ".md", ".c", ".h", ".cfg", ".ini", ".toml", ".csv", ".sh", ".pyi"}
    found: list[Path] = []
    for base, want in ((Path(sysconfig.get_paths()["stdlib"]), exts), (Path("/usr/share/doc"), None)):
        if not base.is_dir():
            continue
        for root, dirs, files in os.walk(base):
            dirs.sort()
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in sorted(files):
                p = Path(root, f)
                if p.is_symlink() or not p.is_file():
                    continue
                if want is None or p.suffix in want:
                    found.append(p)
    return found


def read_text_file(p: Path) -> bytes:
    """The file's text, or b"" if it is binary or unreadable."""
    try:
        data = p.read_bytes()
        if p.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile):
        return b""
    return b"" if b"\0" in data[:8192] else data


def gen_text_file(path: Path, size: int) -> None:
    """Concatenate real text files (repeated if the machine has too little)
    until `size` bytes: compressible like source code and HTML, and not one
    repeated line that any compressor would shrink to nothing."""
    sources = text_sources()
    written = 0
    with open(path, "wb") as out:
        while written < size:
            before = written
            for p in sources:
                data = read_text_file(p)[: size - written]
                out.write(data)
                written += len(data)
                if written >= size:
                    break
            if written == before:
                raise BenchError("found no text files to build the `text` data set from")


def gen_small_files(path: Path, count: int, per_dir: int, size: int) -> None:
    path.mkdir(parents=True)
    for d in range((count + per_dir - 1) // per_dir):
        sub = path / f"d{d:02d}"
        sub.mkdir()
        n = min(per_dir, count - d * per_dir)
        blob = os.urandom(n * size)
        for i in range(n):
            (sub / f"f{i:04d}").write_bytes(blob[i * size : (i + 1) * size])


def stdlib_dir() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def gen_pytree(path: Path, limit: int | None) -> None:
    src = stdlib_dir()
    if limit is None:
        run_cmd(["cp", "-a", str(src), str(path)], timeout=DEFAULT_TIMEOUT)
        return
    # A subset spread over the whole tree (every k-th file), so it keeps the
    # real mix of file sizes and directory depths.
    files: list[Path] = []
    for root, dirs, names in os.walk(src):
        dirs.sort()
        files += [Path(root, n) for n in sorted(names)]
    step = max(1, len(files) // limit)
    for f in files[::step][:limit]:
        dst = path / f.relative_to(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if f.is_symlink():
            os.symlink(os.readlink(f), dst)
        elif f.is_file():
            shutil.copy2(f, dst)


def dataset_specs(quick: bool, big_size: int | None) -> list[tuple[str, str, dict]]:
    big = big_size or (64 * MiB if quick else GiB)
    return [
        ("big-random", "file", {"size": big}),
        ("text", "file", {"size": 40_000_000 if quick else 400_000_000}),
        ("small-20k", "tree", {"count": 2000 if quick else 20_000, "per_dir": 1000, "size": 4096}),
        ("pytree", "tree", {"stdlib": str(stdlib_dir()), "limit": 5000 if quick else None}),
    ]


# The re-sync cases (issue 16): a destination that already holds the pytree
# data set, brought up to date with --delete.
RESYNC = ("resync-same", "resync-1pct")
# In resync-1pct, of the source's regular files in sorted order, those at
# these positions modulo RESYNC_EVERY are changed, and these deleted: 1% each.
RESYNC_EVERY = 100
RESYNC_CHANGE_AT = 17
RESYNC_DELETE_AT = 67
# Appended to each changed file, so its size changes too; its mtime moves a
# day later.
RESYNC_TAG = b"\n# changed by ferry's re-sync benchmark\n"
RESYNC_MTIME_BUMP_NS = 86_400 * 10**9


def resync_datasets(data_dir: Path, pytree: Dataset, names: list[str]) -> list[Dataset]:
    """The re-sync cases, built on the pytree data set, which is also the
    destination's state before every run (the previous deploy).

    resync-same: the source is pytree itself; nothing has to change.
    resync-1pct: a copy of pytree (`cp -al`: the sources are only read, and
    every changed file is a new inode) with 1% of its files changed and 1%
    deleted, chosen by position in sorted order so every run and every
    machine with the same stdlib gets the same sample.
    """
    out = []
    if "resync-same" in names:
        out.append(Dataset("resync-same", "tree", pytree.path, pytree.spec, bytes=pytree.bytes,
                           files=pytree.files, old=pytree.path))
    if "resync-1pct" in names:
        path = data_dir / "resync-1pct"
        remove(path)
        log(f"data set resync-1pct: deriving {path} from pytree ...")
        run_cmd(["cp", "-al", str(pytree.path), str(path)])
        files: list[str] = []
        for root, dirs, names_ in os.walk(path):
            dirs.sort()
            for n in sorted(names_):
                full = os.path.join(root, n)
                if os.path.isfile(full) and not os.path.islink(full):
                    files.append(os.path.relpath(full, path))
        changed = tuple(f for i, f in enumerate(files) if i % RESYNC_EVERY == RESYNC_CHANGE_AT)
        deleted = tuple(f for i, f in enumerate(files) if i % RESYNC_EVERY == RESYNC_DELETE_AT)
        for rel in changed:
            f = path / rel
            st = f.stat()
            data = f.read_bytes()
            f.unlink()  # break the hard link: pytree itself must not change
            f.write_bytes(data + RESYNC_TAG)
            os.chmod(f, st.st_mode & 0o7777)
            os.chown(f, st.st_uid, st.st_gid)
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + RESYNC_MTIME_BUMP_NS))
        for rel in deleted:
            (path / rel).unlink()
        size, count = tree_stats(path)
        log(f"data set resync-1pct: {len(changed)} files changed, {len(deleted)} deleted")
        out.append(Dataset("resync-1pct", "tree", path, {"from": pytree.spec}, bytes=size, files=count,
                           old=pytree.path, changed=changed, deleted=deleted))
    return out


def generate(name: str, path: Path, spec: dict) -> None:
    if name == "big-random":
        gen_random_file(path, spec["size"])
    elif name == "text":
        gen_text_file(path, spec["size"])
    elif name == "small-20k":
        gen_small_files(path, spec["count"], spec["per_dir"], spec["size"])
    elif name == "pytree":
        gen_pytree(path, spec["limit"])
    else:
        raise BenchError(f"unknown data set {name}")


def estimate_bytes(name: str, spec: dict) -> int:
    if name in ("big-random", "text"):
        return spec["size"]
    if name == "small-20k":
        return spec["count"] * spec["size"]
    return 800 * MiB if spec["limit"] is None else 100 * MiB


def ensure_dataset(data_dir: Path, name: str, kind: str, spec: dict) -> Dataset:
    """Generate a data set, or reuse it if its marker says it is complete,
    was built from the same spec and still has the recorded size."""
    path = data_dir / name
    marker = data_dir / f"{name}.json"
    if marker.exists() and path.exists():
        try:
            saved = json.loads(marker.read_text())
            if saved["spec"] == spec and tree_stats(path) == (saved["bytes"], saved["files"]):
                log(f"data set {name}: reusing {path}")
                return Dataset(name, kind, path, spec, bytes=saved["bytes"], files=saved["files"])
        except (ValueError, KeyError, OSError):
            pass
    log(f"data set {name}: generating in {path} ...")
    marker.unlink(missing_ok=True)
    remove(path)
    t = time.perf_counter()
    generate(name, path, spec)
    size, count = tree_stats(path)
    marker.write_text(json.dumps({"spec": spec, "bytes": size, "files": count}))
    log(f"data set {name}: {size / 1e6:.0f} MB in {count} file(s), {time.perf_counter() - t:.1f} s")
    return Dataset(name, kind, path, spec, bytes=size, files=count)


def remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def check_space(workdir: Path, need: int) -> None:
    """tmpfs lives in RAM: check both the file system and available memory."""
    fs_free = shutil.disk_usage(workdir).free
    mem_avail = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            mem_avail = int(line.split()[1]) * 1024
    margin = 512 * MiB
    if fs_free < need + margin:
        raise BenchError(
            f"{workdir}: {fs_free / GiB:.1f} GiB free, the data sets and one copy need "
            f"{(need + margin) / GiB:.1f} GiB; free space or use --workdir / --quick"
        )
    if mem_avail and mem_avail < need + margin:
        raise BenchError(
            f"only {mem_avail / GiB:.1f} GiB of memory available for {(need + margin) / GiB:.1f} GiB "
            f"of tmpfs data; use --quick or a smaller --big-size"
        )


# ---------------------------------------------------------------------------
# Tools. Each one: prepare (once), run (timed, returns where the copy landed
# and the RSS it measured), cleanup (once).
# ---------------------------------------------------------------------------


@dataclass
class Ctx:
    workdir: Path
    dst_root: Path
    logs: Path
    ferry: Path
    timeout: float
    streams: int | None
    run_no: int = 0
    # Whether this run's re-sync destination was put in place (see
    # restore_destination).
    restored: bool = False


@dataclass
class RunResult:
    seconds: float
    landed: Path
    client_rss_kib: int = 0
    server_rss_kib: int = 0


def restore_destination(ctx: Ctx, ds: Dataset) -> None:
    """For a re-sync case, put the previous deploy in place: `cp -a` of the
    old tree to where the tool will write, untimed and the same for every
    tool. A full copy rather than hard links, so that nothing a tool does to
    the destination's inodes can reach the next run's starting state.

    Tools call it once their server listens, just before the clock starts:
    a ferry server walks its whole root when it starts (the sweep of
    abandoned part files, then hourly), which on a long-running server
    happens long before a deploy; started over the empty root, that walk
    costs nothing here, as it would cost nothing then.
    """
    if ds.old is None:
        return
    run_cmd(["cp", "-a", str(ds.old), str(ctx.dst_root / ds.name)], timeout=ctx.timeout)
    ctx.restored = True


def check_exit(p: Proc, what: str, timeout: float) -> None:
    status = p.wait(timeout)
    if status != 0:
        raise RunFailed(f"{what} exited with {status}: {p.log_tail()}")


class Tool:
    name = "?"
    kinds = ("file", "tree")  # what it can copy
    datasets: tuple[str, ...] | None = None  # restrict to these data sets
    needs: tuple[str, ...] = ()  # binaries, installed with apt if missing
    links = False  # whether it runs in the 1 Gbit/s case
    resyncs = False  # whether it runs the re-sync cases (it can delete)

    def supports(self, ds: Dataset) -> bool:
        if ds.net is LINK:
            return self.links
        if ds.resync and not self.resyncs:
            return False
        if ds.kind not in self.kinds:
            return False
        return self.datasets is None or ds.name in self.datasets

    def prepare(self, ctx: Ctx) -> None:
        pass

    def run(self, ctx: Ctx, ds: Dataset) -> RunResult:
        raise NotImplementedError

    def cleanup(self, ctx: Ctx) -> None:
        pass

    def log_path(self, ctx: Ctx, ds: Dataset, role: str) -> Path:
        safe = self.name.replace("|", "-")
        return ctx.logs / f"run{ctx.run_no}-{ds.name}-{safe}-{role}.log"


class Ferry(Tool):
    """ferry server started fresh per run, so its peak RSS is per run."""

    name = "ferry"
    links = True
    resyncs = True

    def __init__(self, compress: str | None = None, name: str | None = None,
                 datasets: tuple[str, ...] | None = None, links: bool = True,
                 tls: bool = True, binary: Path | None = None,
                 streams: int | None = None, env: dict[str, str] | None = None):
        self.compress = compress
        self.tls = tls
        # A fixed --streams of its own, and environment for the client
        # (FERRY_TCP_CONGESTION, in bench/wan.py's Reno case).
        self.streams = streams
        self.env = env or {}
        # Another build (--baseline), run interleaved with this one.
        self.binary = binary
        self.name = name or self.name
        self.datasets = datasets
        self.links = links
        self.streams_supported = False
        self.state_dir_supported = False

    def exe(self, ctx: Ctx) -> str:
        return str(self.binary or ctx.ferry)

    def prepare(self, ctx: Ctx) -> None:
        help_text = subprocess.run([self.exe(ctx), "up", "--help"], capture_output=True,
                                   text=True, timeout=30).stdout
        self.streams_supported = "--streams" in help_text
        # A ferry with TLS keeps its key and known_hosts in a state
        # directory: the bench's own, never the user's.
        self.state_dir_supported = "--state-dir" in help_text
        # A ferry with authentication wants a token from a server on a
        # network address (the 1 Gbit/s case): both sides get the bench's.
        self.token_supported = "--token-file" in help_text
        if ctx.streams is not None and not self.streams_supported:
            log(f"note: this ferry has no --streams option; --streams {ctx.streams} is ignored")

    def run(self, ctx: Ctx, ds: Dataset) -> RunResult:
        net = ds.net
        port = free_port()
        state = ["--state-dir", str(ctx.workdir / "ferry-state")] if self.state_dir_supported else []
        if self.token_supported:
            state += ["--token-file", str(bench_token(ctx.workdir))]
        if not self.tls:
            state += ["--no-tls"]
        server = start_server(
            net.server([self.exe(ctx), "server", "--host", net.server_host,
                        "--port", str(port), "--root", str(ctx.dst_root)] + state),
            port, self.log_path(ctx, ds, "server"))
        try:
            restore_destination(ctx, ds)
            argv = [self.exe(ctx), "up", str(ds.path), ds.name,
                    "--host", net.server_host, "--port", str(port), "-q"] + state
            if ds.resync:
                argv.append("--delete")
            if self.compress:
                argv += ["--compress", self.compress]
            streams = self.streams if self.streams is not None else ctx.streams
            if streams is not None and self.streams_supported:
                argv += ["--streams", str(streams)]
            if self.env:
                argv = ["env", *(f"{k}={v}" for k, v in self.env.items()), *argv]
            t0 = time.perf_counter()
            client = Proc(net.client(argv), self.log_path(ctx, ds, "client"), measure_rss=True)
            # The client exits only after the server's verdict on every file,
            # so its exit is the end of the transfer.
            check_exit(client, "ferry up", ctx.timeout)
            seconds = client.end - t0
            server_rss = server.vmhwm_kib()
        finally:
            server.stop()
        return RunResult(seconds, ctx.dst_root / ds.name, client.maxrss_kib, server_rss)


class SocatRaw(Tool):
    """The floor: bytes from one file into another through a TCP socket."""

    name = "socat"
    kinds = ("file",)
    needs = ("socat",)

    def run(self, ctx: Ctx, ds: Dataset) -> RunResult:
        port = free_port()
        dst = ctx.dst_root / ds.name
        receiver = start_server(
            ["socat", "-u", f"TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1", f"OPEN:{dst},creat,trunc"],
            port, self.log_path(ctx, ds, "receiver"))
        try:
            t0 = time.perf_counter()
            sender = Proc(["socat", "-u", f"OPEN:{ds.path}", f"TCP:127.0.0.1:{port}"],
                          self.log_path(ctx, ds, "sender"), measure_rss=True)
            check_exit(sender, "socat sender", ctx.timeout)
            check_exit(receiver, "socat receiver", ctx.timeout)
        finally:
            receiver.stop()
        return RunResult(receiver.end - t0, dst, sender.maxrss_kib)


class TarSocat(Tool):
    """tar piped through socat: the classic `tar | nc` with no checks at all."""

    name = "tar|socat"
    needs = ("socat", "tar")

    def run(self, ctx: Ctx, ds: Dataset) -> RunResult:
        port = free_port()
        dst = ctx.dst_root / ds.name
        dst.mkdir()
        if ds.kind == "file":
            what = f"-C {shlex.quote(str(ds.path.parent))} {shlex.quote(ds.path.name)}"
            landed = dst / ds.path.name
        else:
            what = f"-C {shlex.quote(str(ds.path))} ."
            landed = dst
        recv_cmd = (f"set -o pipefail; socat -u TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1 STDOUT"
                    f" | tar -x -C {shlex.quote(str(dst))}")
        send_cmd = f"set -o pipefail; tar -c {what} | socat -u STDIN TCP:127.0.0.1:{port}"
        receiver = start_server(["bash", "-c", recv_cmd], port, self.log_path(ctx, ds, "receiver"))
        try:
            t0 = time.perf_counter()
            sender = Proc(["bash", "-c", send_cmd], self.log_path(ctx, ds, "sender"), measure_rss=True)
            check_exit(sender, "tar|socat sender", ctx.timeout)
            # Done when the receiving tar has written everything and exited.
            check_exit(receiver, "socat|tar receiver", ctx.timeout)
        finally:
            receiver.stop()
        return RunResult(receiver.end - t0, landed, sender.maxrss_kib)


class Rsync(Tool):
    """rsync in daemon mode (no ssh in the way), as fast as rsync gets."""

    needs = ("rsync",)
    links = True
    resyncs = True

    def __init__(self, compress: bool, delete_after: bool = False):
        self.compress = compress
        self.delete_after = delete_after
        self.name = "rsync -z" if compress else "rsync --delete-after" if delete_after else "rsync"
        # -z only where compression can pay: the text file, and the link.
        self.datasets = ("text",) if compress else RESYNC if delete_after else None
        self.links = not delete_after

    def run(self, ctx: Ctx, ds: Dataset) -> RunResult:
        net = ds.net
        port = free_port()
        conf = ctx.workdir / "etc" / f"rsyncd-{port}.conf"
        conf.write_text(
            f"port = {port}\n"
            f"address = {net.server_host}\n"
            "use chroot = no\n"
            "reverse lookup = no\n"  # no DNS inside the namespaces
            f"log file = {ctx.logs / 'rsyncd.log'}\n"
            "[bench]\n"
            f"  path = {ctx.dst_root}\n"
            "  read only = false\n"
            "  uid = root\n"
            "  gid = root\n"
        )
        daemon = start_server(
            net.server(["rsync", "--daemon", "--no-detach", f"--config={conf}"]),
            port, self.log_path(ctx, ds, "daemon"))
        try:
            restore_destination(ctx, ds)
            url = f"rsync://{net.server_host}:{port}/bench/{ds.name}"
            flags = ["-az" if self.compress else "-a"] + (["--delete"] if ds.resync else [])
            if self.delete_after:
                flags.append("--delete-after")
            # A trailing slash on a directory copies its contents into NAME,
            # so NAME mirrors the source like ferry's and scp's copies.
            src = f"{ds.path}/" if ds.kind == "tree" else str(ds.path)
            dest = f"{url}/" if ds.kind == "tree" else url
            t0 = time.perf_counter()
            client = Proc(net.client(["rsync", *flags, src, dest]),
                          self.log_path(ctx, ds, "client"), measure_rss=True)
            # rsync's client ends only after the daemon's final acknowledgement.
            check_exit(client, "rsync", ctx.timeout)
        finally:
            daemon.stop()
            conf.unlink(missing_ok=True)
        return RunResult(client.end - t0, ctx.dst_root / ds.name, client.maxrss_kib)


class Scp(Tool):
    """scp against an sshd of our own on 127.0.0.1, with a generated key."""

    name = "scp"
    needs = ("sshd", "scp", "ssh-keygen")

    def __init__(self, tree_runs: int):
        self.tree_runs = tree_runs

    def prepare(self, ctx: Ctx) -> None:
        etc = ctx.workdir / "etc"
        self.host_key = etc / "ssh_host_ed25519_key"
        self.client_key = etc / "client_ed25519_key"
        for key in (self.host_key, self.client_key):
            if not key.exists():
                run_cmd(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], timeout=30)
        shutil.copy(f"{self.client_key}.pub", etc / "authorized_keys")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        self.port = 2222 if port_is_free(2222) else free_port()
        self.config = etc / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {etc / 'authorized_keys'}\n"
            "PermitRootLogin yes\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            # The work directory is in world-writable /dev/shm, which
            # StrictModes would refuse for the authorized_keys path.
            "StrictModes no\n"
            f"PidFile {etc / 'sshd.pid'}\n"
            # OpenSSH 9 scp speaks SFTP by default.
            "Subsystem sftp internal-sftp\n"
            "LogLevel ERROR\n"
        )
        run_cmd([sshd_path(), "-t", "-f", str(self.config)], timeout=30)

    def supports(self, ds: Dataset) -> bool:
        return ds.net is LOOPBACK and not ds.resync

    def skip_run(self, ds: Dataset, run_no: int) -> bool:
        # scp takes 30-100 s per tree: --scp-tree-runs bounds the total time.
        return ds.kind == "tree" and run_no > self.tree_runs

    def run(self, ctx: Ctx, ds: Dataset) -> RunResult:
        sshd = start_server([sshd_path(), "-D", "-f", str(self.config), "-E",
                             str(self.log_path(ctx, ds, "sshd-E"))],
                            self.port, self.log_path(ctx, ds, "sshd"))
        try:
            argv = ["scp", "-q", "-r", "-P", str(self.port), "-i", str(self.client_key),
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                    str(ds.path), f"root@127.0.0.1:{ctx.dst_root / ds.name}"]
            t0 = time.perf_counter()
            client = Proc(argv, self.log_path(ctx, ds, "client"), measure_rss=True)
            check_exit(client, "scp", ctx.timeout)
        finally:
            sshd.stop()
        return RunResult(client.end - t0, ctx.dst_root / ds.name, client.maxrss_kib)


def sshd_path() -> str:
    # sshd refuses to start unless invoked with an absolute path.
    return shutil.which("sshd") or "/usr/sbin/sshd"


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def make_tools(args) -> list[Tool]:
    return [
        Ferry(),
        # `off` beside `auto` on data where compression cannot or can pay.
        Ferry(compress="off", name="ferry-nocompress", datasets=("big-random", "text"), links=False),
        # What TLS costs: the same defaults over plain TCP.
        Ferry(name="ferry-no-tls", tls=False),
        SocatRaw(),
        TarSocat(),
        Rsync(compress=False),
        Rsync(compress=True),
        # Deletes once everything is in place, as ferry does. rsync's own
        # default, --delete-during, goes with its incremental recursion;
        # --delete-after needs the whole file list first and turns it off.
        Rsync(compress=False, delete_after=True),
        Scp(args.scp_tree_runs),
    ] + baseline_tools(args.baseline)


def baseline_tools(baseline: Path | None) -> list[Tool]:
    """Another ferry build beside this one, interleaved run by run: what a
    change did to the speed, measured under the same machine conditions."""
    if baseline is None:
        return []
    exe = baseline.resolve()
    if not os.access(exe, os.X_OK):
        raise BenchError(f"--baseline {baseline} is not an executable")
    return [Ferry(name="ferry-base", binary=exe),
            Ferry(name="ferry-base-no-tls", tls=False, binary=exe)]


TOOL_ALIASES = {"tar": "tar|socat", "rsync-z": "rsync -z", "socat-raw": "socat",
                "rsync-delete-after": "rsync --delete-after"}

# apt package for each binary a tool needs.
PACKAGES = {"rsync": "rsync", "socat": "socat", "sshd": "openssh-server", "scp": "openssh-client",
            "ssh-keygen": "openssh-client", "ip": "iproute2", "tc": "iproute2", "tar": "tar",
            "diff": "diffutils", "cmp": "diffutils", "time": "time"}


def install_missing(binaries: set[str]) -> None:
    missing = sorted({PACKAGES[b] for b in binaries if not (shutil.which(b) or
                      (b == "sshd" and Path("/usr/sbin/sshd").exists()))})
    if not missing:
        return
    log(f"installing with apt: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, capture_output=True, timeout=DEFAULT_TIMEOUT).returncode != 0:
        # Only refresh the package lists when the install needs it.
        run_cmd(["apt-get", "update"], env=env)
        run_cmd(install, env=env)


# ---------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------


def verify(src: Path, landed: Path, kind: str, timeout: float) -> None:
    """The copy must match the source byte for byte (cmp for a file, diff -r
    for a tree, which also catches missing and extra entries)."""
    if not landed.exists():
        raise RunFailed(f"nothing arrived at {landed}")
    if kind == "file":
        argv = ["cmp", "-s", str(src), str(landed)]
    else:
        argv = ["diff", "-r", "-q", "--no-dereference", str(src), str(landed)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RunFailed(f"verification timed out: {shlex.join(argv)}") from e
    if r.returncode != 0:
        first = (r.stdout or r.stderr).strip().splitlines()[:3]
        raise RunFailed("copy differs from the source: " + ("; ".join(first) or f"{argv[0]} exit {r.returncode}"))


def tree_meta(root: Path) -> dict[str, tuple]:
    """`root` and every entry below it with what `-a` keeps: kind, mode,
    owner, mtime (to the nanosecond; not a symlink's) and size or target."""
    st = os.lstat(root)
    out: dict[str, tuple] = {".": ("dir", st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            full = os.path.join(dirpath, n)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", st.st_uid, st.st_gid, os.readlink(full))
            else:
                out[rel] = ("file", st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)
    return out


def verify_resync(ds: Dataset, landed: Path) -> None:
    """After a re-sync, beyond verify's content check: what the source lost
    is gone, and every entry has the source's metadata, so the next re-sync
    would find nothing to do (diff -r compares content only)."""
    left = [rel for rel in ds.deleted if os.path.lexists(landed / rel)]
    if left:
        raise RunFailed(f"{len(left)} deleted file(s) still in the destination, e.g. {left[0]}")
    want, got = tree_meta(ds.path), tree_meta(landed)
    if want.keys() != got.keys():
        extra = sorted(got.keys() - want.keys())[:3]
        missing = sorted(want.keys() - got.keys())[:3]
        raise RunFailed(f"entries differ from the source: extra {extra}, missing {missing}")
    wrong = sorted(rel for rel in want if want[rel] != got[rel])
    if wrong:
        raise RunFailed(f"{len(wrong)} entries differ in metadata from the source, e.g. "
                        f"{wrong[0]}: {want[wrong[0]]} != {got[wrong[0]]}")


# ---------------------------------------------------------------------------
# The interleaved runs
# ---------------------------------------------------------------------------


@dataclass
class Series:
    """All runs of one tool on one data set."""

    seconds: list[float] = field(default_factory=list)
    client_rss: list[int] = field(default_factory=list)
    server_rss: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def median(self) -> float | None:
        if self.failures or not self.seconds:
            return None
        return statistics.median(self.seconds)


def run_all(ctx: Ctx, datasets: list[Dataset], tools: list[Tool], runs: int) -> dict:
    results: dict[tuple[str, str], Series] = {}
    for run_no in range(1, runs + 1):
        ctx.run_no = run_no
        for ds in datasets:
            applicable = [t for t in tools if t.supports(ds)]
            # Rotate the order each run so no tool always goes first (or
            # always follows the same neighbour).
            shift = (run_no - 1) % max(1, len(applicable))
            for tool in applicable[shift:] + applicable[:shift]:
                if isinstance(tool, Scp) and tool.skip_run(ds, run_no):
                    continue
                series = results.setdefault((ds.name, tool.name), Series())
                one_run(ctx, ds, tool, series, run_no, runs)
    return results


def one_run(ctx: Ctx, ds: Dataset, tool: Tool, series: Series, run_no: int, runs: int) -> None:
    label = f"run {run_no}/{runs} {ds.name:<11} {tool.name:<20}"
    remove(ctx.dst_root)  # not timed
    ctx.dst_root.mkdir(parents=True)
    ctx.restored = False
    try:
        r = tool.run(ctx, ds)
        if ds.resync and not ctx.restored:
            raise BenchError(f"{tool.name} ran {ds.name} without restoring the destination first")
        verify(ds.path, r.landed, ds.kind, ctx.timeout)
        if ds.resync:
            verify_resync(ds, r.landed)
    except RunFailed as e:
        series.failures.append(str(e))
        log(f"{label} FAILED: {e}")
        return
    finally:
        remove(ctx.dst_root)
    series.seconds.append(r.seconds)
    series.client_rss.append(r.client_rss_kib)
    series.server_rss.append(r.server_rss_kib)
    rate = ds.bytes / 1e6 / r.seconds if r.seconds > 0 else float("inf")
    shown = "" if ds.resync else f"  {rate:8.1f} MB/s"  # a re-sync moves next to nothing
    log(f"{label} {r.seconds:8.3f} s{shown}  rss {r.client_rss_kib / 1024:.0f} MiB"
        + (f" / server {r.server_rss_kib / 1024:.0f} MiB" if r.server_rss_kib else ""))


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def machine_info() -> list[str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = "?"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return [f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {cpu}",
            f"Linux {platform.release()}, {mem} RAM"]


def ferry_version(ferry: Path, origin: str) -> str:
    try:
        v = subprocess.run([str(ferry), "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        v = "ferry ?"
    return f"{(v.splitlines() or ['ferry ?'])[0]}, {origin}"


def ferry_binary(given: Path | None) -> tuple[Path, str]:
    """The ferry binary to measure, and where it came from: `given`, or a
    release build of this tree (its revision taken before building: the
    tree may change while the benchmark runs)."""
    if given:
        ferry, origin = given.resolve(), f"binary {given}"
    else:
        origin = f"built from {git_revision()}"
        ferry = build_ferry()
    if not os.access(ferry, os.X_OK):
        raise BenchError(f"{ferry} is not an executable")
    return ferry, origin


def rsync_version() -> str:
    """The first line of `rsync --version`, spaces squeezed."""
    try:
        out = subprocess.run(["rsync", "--version"], capture_output=True, text=True, timeout=10).stdout
        return " ".join(out.splitlines()[0].split())
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


def write_report(text: str, out: Path) -> None:
    """Print the report and write it to `out`."""
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    log(f"report written to {out}")


def git_revision() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def fmt_mib(kib_values: list[int]) -> str:
    values = [v for v in kib_values if v]
    return f"{max(values) / 1024:.0f}" if values else "–"


def resync_table(ds: Dataset, tools: list[Tool], results: dict) -> list[str]:
    """A re-sync moves next to nothing, so no MB/s: the time, its spread over
    the runs, and the ratio to rsync's time that issue 16 sets targets for."""
    what = ("nothing changed" if not ds.deleted and not ds.changed else
            f"{len(ds.changed):,} files changed (content appended, so the size differs; mtime a day later) "
            f"and {len(ds.deleted):,} deleted in the source")
    # Ratios to rsync's default (what issue 16's targets name) and, if it
    # ran, to rsync deleting after the transfer as ferry does.
    peers = [t for t in ("rsync", "rsync --delete-after") if (ds.name, t) in results]
    peer_s = {t: results[(ds.name, t)].median() for t in peers}
    lines = [f"### {ds.name}: `--delete` into a copy of pytree ({ds.files:,} files in the source), "
             f"{what}, loopback", "",
             "| tool | median s | min–max s | every run, s | "
             + "".join(f"time / {md_escape(t)}'s | " for t in peers)
             + "peak RSS client MiB | peak RSS server MiB | runs |",
             "|---|---:|---:|---|" + "---:|" * len(peers) + "---:|---:|---:|"]
    for tool in tools:
        s = results.get((ds.name, tool.name))
        if s is None:
            continue
        ok = len(s.seconds)
        total = ok + len(s.failures)
        med = s.median()
        if med is None:
            reason = s.failures[0] if s.failures else "no run"
            lines.append(f"| {md_escape(tool.name)} | FAILED | – | – | " + "– | " * len(peers)
                         + f"– | – | {ok}/{total} ok: {md_escape(reason[:160])} |")
            continue
        ratios = "".join(f"{med / peer_s[t]:.2f} | " if peer_s[t] else "– | " for t in peers)
        every = ", ".join(f"{x:.2f}" for x in s.seconds)
        server = fmt_mib(s.server_rss) if isinstance(tool, Ferry) else "–"
        lines.append(f"| {md_escape(tool.name)} | {med:.3f} | {min(s.seconds):.3f}–{max(s.seconds):.3f} | {every} "
                     f"| {ratios}{fmt_mib(s.client_rss)} | {server} | {ok} |")
    return lines + [""]


def dataset_table(ds: Dataset, tools: list[Tool], results: dict) -> list[str]:
    if ds.resync:
        return resync_table(ds, tools, results)
    where = "1 Gbit/s veth between two namespaces" if ds.net is LINK else "loopback"
    lines = [f"### {ds.name}: {ds.bytes / 1e6:,.0f} MB in {ds.files:,} file(s), {where}", "",
             "| tool | median s | MB/s | vs ferry (tool time / ferry time) | peak RSS client MiB | peak RSS server MiB | runs |",
             "|---|---:|---:|---|---:|---:|---:|"]
    ferry_s = results.get((ds.name, "ferry"), Series()).median()
    for tool in tools:
        s = results.get((ds.name, tool.name))
        if s is None:
            continue
        ok = len(s.seconds)
        total = ok + len(s.failures)
        med = s.median()
        if med is None:
            reason = s.failures[0] if s.failures else "no run"
            lines.append(f"| {md_escape(tool.name)} | FAILED | – | – | – | – | {ok}/{total} ok: {md_escape(reason[:160])} |")
            continue
        rate = ds.bytes / 1e6 / med
        if tool.name == "ferry":
            ratio = "1.00 (baseline)"
        elif ferry_s:
            r = med / ferry_s
            ratio = f"{r:.2f}: ferry is {r:.2f}× faster" if r >= 1 else f"{r:.2f}: ferry is {1 / r:.2f}× slower"
        else:
            ratio = "–"
        server = fmt_mib(s.server_rss) if isinstance(tool, Ferry) else "–"
        lines.append(f"| {md_escape(tool.name)} | {med:.3f} | {rate:,.1f} | {ratio} | {fmt_mib(s.client_rss)} | {server} | {ok} |")
    return lines + [""]


def md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def targets(results: dict) -> list[str]:
    """Issue 3's targets, judged on the medians of this run.

    A check is FAIL when ferry failed, SKIP when it could not be judged (not
    measured, or the peer failed), else PASS or FAIL on the numbers.
    """

    def med(ds: str, tool: str) -> float | None:
        s = results.get((ds, tool))
        return s.median() if s else None

    def failed(ds: str, tool: str) -> bool:
        s = results.get((ds, tool))
        return bool(s and s.failures)

    def compare(ds: str, ferry: str, other: str, factor: float, what: str) -> tuple[bool | None, str]:
        """ferry's rate ≥ factor × other's rate, i.e. other_time ≥ factor × ferry_time."""
        if failed(ds, ferry):
            return False, f"{ferry} FAILED on {ds}"
        f, o = med(ds, ferry), med(ds, other)
        if f is None:
            return None, f"{ferry} not measured on {ds}"
        if o is None:
            return None, f"{other} {'FAILED' if failed(ds, other) else 'not measured'} on {ds}"
        return o >= factor * f, f"{o / f:.2f}× {what} (need ≥ {factor:g}×)"

    def faster_by(ds: str, other: str, factor: float) -> tuple[bool | None, str]:
        return compare(ds, "ferry", other, factor, f"{other}'s rate")

    rows = []

    def add(name: str, *checks: tuple[bool | None, str]) -> None:
        oks = [c[0] for c in checks]
        if False in oks:
            verdict = "FAIL"
        elif None in oks:
            verdict = "SKIP"
        else:
            verdict = "PASS"
        measured = "; ".join(dict.fromkeys(c[1] for c in checks))  # each message once
        rows.append(f"| {md_escape(name)} | {md_escape(measured)} | {verdict} |")

    add("big file ≥ 0.8× socat and ≥ 1.5× rsync", faster_by("big-random", "socat", 0.8),
        faster_by("big-random", "rsync", 1.5))
    add("pytree faster than tar|socat and ≥ 1.6× rsync", faster_by("pytree", "tar|socat", 1.0),
        faster_by("pytree", "rsync", 1.6))
    add("small-20k faster than tar|socat", faster_by("small-20k", "tar|socat", 1.0))
    add("1 Gbit/s text ≥ 1.3× rsync -z", faster_by("text-1gbit", "rsync -z", 1.3))
    # auto within 5% of off: auto_time ≤ 1.05 × off_time.
    ok, msg = compare("big-random", "ferry", "ferry-nocompress", 1 / 1.05, "")
    if ok is not None and not failed("big-random", "ferry"):
        auto, off = med("big-random", "ferry"), med("big-random", "ferry-nocompress")
        msg = f"auto time / off time = {auto / off:.3f} (need ≤ 1.05)"
    add("random data: auto within 5% of off", (ok, msg))

    ferry_series = [s for (_, t), s in results.items() if t.startswith("ferry")]
    client = [v for s in ferry_series for v in s.client_rss if v]
    server = [v for s in ferry_series for v in s.server_rss if v]
    if client and server:
        c, sv = max(client) / 1024, max(server) / 1024
        add("ferry peak RSS ≤ 100 MiB", (c <= 100 and sv <= 100, f"client {c:.0f} MiB, server {sv:.0f} MiB"))
    else:
        add("ferry peak RSS ≤ 100 MiB", (None, "not measured"))
    return ["## Targets (issue 3)", "", "| target | measured (medians) | verdict |", "|---|---|---|", *rows, ""]


def resync_targets(results: dict) -> list[str]:
    """Issue 16's targets: ferry up --delete at most a given fraction of
    rsync -a --delete's time (medians), PASS, FAIL or SKIP as in targets."""
    rows = []
    for ds, most, what in (("resync-1pct", 0.7, "re-sync, 1% changed and 1% deleted"),
                           ("resync-same", 0.5, "re-sync, nothing changed")):
        f, r = results.get((ds, "ferry")), results.get((ds, "rsync"))
        if f is not None and f.failures:
            verdict, measured = "FAIL", f"ferry FAILED on {ds}"
        elif f is None or r is None or r.median() is None:
            verdict, measured = "SKIP", f"ferry or rsync not measured on {ds}"
        else:
            ratio = f.median() / r.median()
            verdict = "PASS" if ratio <= most else "FAIL"
            measured = f"ferry {f.median():.3f} s / rsync {r.median():.3f} s = {ratio:.2f}"
            after = results.get((ds, "rsync --delete-after"))
            if after is not None and after.median():
                measured += (f" (not the target: / rsync --delete-after {after.median():.3f} s = "
                             f"{f.median() / after.median():.2f})")
        rows.append(f"| {what}: ferry ≤ {most:g}× rsync's time | {measured} | {verdict} |")
    return ["## Targets (issue 16)", "", "| target | measured (medians) | verdict |", "|---|---|---|", *rows, ""]


def report(args, ctx: Ctx, ferry_origin: str, datasets: list[Dataset], tools: list[Tool],
           results: dict, notes: list[str], started: datetime.datetime, elapsed: float) -> str:
    lines = ["# ferry benchmark", "",
             f"- date: {started.strftime('%Y-%m-%d %H:%M %Z').strip()}, {elapsed / 60:.1f} min in all",
             *[f"- machine: {m}" for m in machine_info()],
             f"- ferry: {ferry_version(ctx.ferry, ferry_origin)}",
             f"- command: `{shlex.join(['python3', *sys.argv])}`",
             f"- {args.runs} interleaved run(s); medians; peak RSS is the largest over the runs; "
             "MB/s = file bytes / 10^6 / median seconds",
             ]
    lines += [f"- note: {n}" for n in notes]
    lines.append("")
    for ds in datasets:
        lines += dataset_table(ds, tools, results)
    lines += targets(results)
    if any(ds.resync for ds in datasets):
        lines += resync_targets(results)
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def build_ferry() -> Path:
    """cargo build --release -p ferry; the binary's path comes from cargo
    itself, so CARGO_TARGET_DIR and any target layout are honoured."""
    log("building ferry (release) ...")
    try:
        r = subprocess.run(["cargo", "build", "--release", "-p", "ferry", "--message-format=json"],
                           cwd=REPO, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"cargo build failed: {e}") from e
    exe = None
    for line in r.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "ferry" \
                and msg.get("executable"):
            exe = msg["executable"]
    if r.returncode != 0 or not exe:
        errors = [json.loads(l)["message"]["rendered"] for l in r.stdout.splitlines()
                  if '"compiler-message"' in l and '"level":"error"' in l]
        raise BenchError("cargo build --release -p ferry failed:\n" + ("".join(errors[:3]) or r.stderr[-2000:]))
    return Path(exe)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Data sets: big-random, text, small-20k, pytree (and the link case, "
                                       "text-1gbit; the re-syncs with --delete, resync-same and resync-1pct). Tools: ferry, ferry-nocompress, ferry-no-tls, socat, tar, rsync, rsync-z, rsync-delete-after (re-syncs only), scp; ferry-base, ferry-base-no-tls with --baseline.")
    p.add_argument("--runs", type=int, help="interleaved runs per tool and data set (default 3, 1 with --quick)")
    p.add_argument("--datasets", help="comma list of data sets (default: all)")
    p.add_argument("--tools", help="comma list of tools (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny data sets and one run: a smoke test")
    p.add_argument("--streams", type=int, help="pass --streams N to ferry (if it has the option)")
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm/ferry-bench"), help="tmpfs work directory")
    p.add_argument("--keep", action="store_true", help="keep the generated data sets for the next run")
    p.add_argument("--no-link", dest="link", action="store_false", help="skip the 1 Gbit/s case")
    p.add_argument("--ferry", type=Path, help="use this ferry binary instead of building one")
    p.add_argument("--baseline", type=Path,
                   help="also run this other ferry binary (tools ferry-base, ferry-base-no-tls), "
                        "interleaved with the one under test")
    p.add_argument("--big-size", type=int, help="size of big-random in MiB")
    p.add_argument("--scp-tree-runs", type=int, default=1, help="runs of scp on the tree data sets (default 1)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds allowed per command")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latest.md", help="report file")
    args = p.parse_args()
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def select(names: str | None, known: list[str], what: str) -> list[str]:
    if not names:
        return known
    chosen = [TOOL_ALIASES.get(n.strip(), n.strip()) for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise BenchError(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return chosen


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        raise BenchError("run as root: the bench installs packages, starts sshd and creates network namespaces")
    started = datetime.datetime.now().astimezone()
    t_start = time.perf_counter()

    all_tools = make_tools(args)
    chosen_tools = select(args.tools, [t.name for t in all_tools], "tool")
    tools = [t for t in all_tools if t.name in chosen_tools]
    specs = dataset_specs(args.quick, args.big_size * MiB if args.big_size else None)
    ds_names = [s[0] for s in specs] + ["text-1gbit", *RESYNC]
    chosen_ds = select(args.datasets, ds_names, "data set")
    want_link = args.link and "text-1gbit" in chosen_ds
    want_resync = [n for n in RESYNC if n in chosen_ds]
    # The link case sends the text file, and the re-sync cases start from
    # pytree: those must exist even if their own runs were not asked for.
    generate_ds = set(chosen_ds) | ({"text"} if want_link else set()) | ({"pytree"} if want_resync else set())

    needs = {"tar", "diff", "cmp", "time"} | {b for t in tools for b in t.needs}
    if want_link:
        needs |= {"ip", "tc"}
    install_missing(needs)

    ferry, ferry_origin = ferry_binary(args.ferry)

    workdir = args.workdir.resolve()
    data_dir = workdir / ("data-quick" if args.quick else "data")
    remove(workdir / "logs")  # logs of this run only, so failures quote the right lines
    for d in (data_dir, workdir / "etc", workdir / "logs"):
        d.mkdir(parents=True, exist_ok=True)
    wanted_specs = [s for s in specs if s[0] in generate_ds]
    need = sum(estimate_bytes(n, sp) for n, _, sp in wanted_specs if not (data_dir / f"{n}.json").exists())
    need += max((estimate_bytes(n, sp) for n, _, sp in wanted_specs), default=0)  # one copy at a time
    check_space(workdir, need)

    ctx = Ctx(workdir=workdir, dst_root=workdir / "dst", logs=workdir / "logs", ferry=ferry,
              timeout=args.timeout, streams=args.streams)
    notes: list[str] = []
    link_up = False
    prepared: list[Tool] = []
    try:
        datasets = [ensure_dataset(data_dir, n, k, sp) for n, k, sp in wanted_specs]
        if want_link:
            try:
                link_up = True  # even half-built, it must be torn down
                create_link()
                txt = next(d for d in datasets if d.name == "text")
                datasets.append(Dataset("text-1gbit", "file", txt.path, txt.spec, LINK, txt.bytes, txt.files))
            except BenchError as e:
                notes.append(f"1 Gbit/s case skipped: could not set up the network namespaces ({e})")
                log(f"note: {notes[-1]}")
        elif not args.link:
            notes.append("1 Gbit/s case skipped (--no-link)")
        if want_resync:
            pytree = next(d for d in datasets if d.name == "pytree")
            datasets += resync_datasets(data_dir, pytree, want_resync)
        # `text` may have been generated only for the link case.
        datasets = [d for d in datasets if d.name in chosen_ds or d.net is LINK]
        for t in tools:
            t.prepare(ctx)
            prepared.append(t)
        load_before = os.getloadavg()
        results = run_all(ctx, datasets, tools, args.runs)
        # Other work on the machine shows in every tool's times: the report
        # says how busy it was.
        notes.append("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f} before the runs, "
                     "{:.2f} {:.2f} {:.2f} after".format(*load_before, *os.getloadavg()))
    finally:
        kill_all_live()
        for t in prepared:
            t.cleanup(ctx)
        if link_up:
            delete_link()
        remove(ctx.dst_root)
        # Derived from pytree at every start: never reused.
        remove(data_dir / "resync-1pct")
        if not args.keep:
            remove(data_dir)

    text = report(args, ctx, ferry_origin, datasets, tools, results, notes, started,
                  time.perf_counter() - t_start)
    write_report(text, args.out)
    return 0


def interrupted_by_sigterm(signum, frame):
    # Treated like ^C so that every finally block (servers, namespaces) runs.
    raise KeyboardInterrupt


def run_main(main_fn) -> None:
    """A bench script's entry point: SIGTERM unwinds like ^C (so servers and
    namespaces are cleaned up), a bench failure is one line and status 1,
    an interruption status 130."""
    signal.signal(signal.SIGTERM, interrupted_by_sigterm)
    try:
        sys.exit(main_fn())
    except (BenchError, RunFailed) as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_main(main)
