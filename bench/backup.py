#!/usr/bin/env python3
"""Daily backups: ferry backup against rsync -a --link-dest (issue 17).

    python3 bench/backup.py            # 3 sequences of 7 days on pytree
    python3 bench/backup.py --quick    # smoke test: 5000 files, 1 sequence

Day 0 backs up the CPython stdlib tree (the `pytree` data set of run.py)
in full; on each of days 1-6 a deterministic 1% of its files gets new
content and a new mtime, and the tree is backed up again: by `ferry
backup` into a directory of snapshots, and by `rsync -a --link-dest` into
DAY0..DAY6 through an rsync daemon. Every backup lands on an ext4 file
system of its own (a loop image in tmpfs, made afresh for each sequence),
so `du` and `statvfs` count what a real disk would hold: blocks, inodes,
directories. For each day and tool it records the wall time, the bytes on
the wire (the tool's own count, and the IP bytes on the loopback of a
network namespace of the bench's own, where servers and clients run), the
disk the new snapshot added, and checks that the snapshot equals the
source and that unchanged files are hard links to the previous snapshot's.

The tools run back to back on the same day's source, the first one
rotating from day to day; the whole sequence is repeated from scratch.

Python 3 standard library only; needs root (loop mounts, a network
namespace). Helpers come from bench/run.py. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as rb  # noqa: E402  (bench/run.py: processes, data sets, build)
from run import BenchError, Proc, RunFailed, log  # noqa: E402

NETNS = "ferrybench-backup"
# Changed files get mtimes on these days (UTC), one day apart: new, and
# the same in every sequence.
MTIME_BASE = 1_796_515_200  # 2026-12-06T00:00:00Z
# What a change adds to a file's size.
GROWTH = 64


# ---------------------------------------------------------------------------
# The source and its daily changes
# ---------------------------------------------------------------------------


def regular_files(tree: Path) -> list[str]:
    """Relative paths of the regular files below `tree`, sorted."""
    out = []
    for root, dirs, names in os.walk(tree):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(root, n)
            if not os.path.islink(p) and os.path.isfile(p):
                out.append(os.path.relpath(p, tree))
    return out


def day_sample(files: list[str], day: int, fraction: float) -> list[str]:
    """The files changed on `day`: the same in every sequence."""
    k = max(1, round(len(files) * fraction))
    return sorted(random.Random(f"ferry-bench-backup day {day}").sample(files, k))


def change_files(src: Path, rels: list[str], day: int) -> int:
    """Rewrite each file with new content (deterministic pseudo-random
    bytes, GROWTH bytes longer than before: nothing of the old content is
    left for a delta algorithm to reuse) and a new mtime. Returns the bytes
    of the new contents."""
    total = 0
    mtime = MTIME_BASE + day * 86_400
    for rel in rels:
        p = src / rel
        size = p.stat().st_size + GROWTH
        p.write_bytes(random.Random(f"{day} {rel}").randbytes(size))
        os.utime(p, (mtime, mtime))
        total += size
    return total


# ---------------------------------------------------------------------------
# Where the snapshots land: an ext4 file system per tool
# ---------------------------------------------------------------------------


def make_fs(image: Path, mnt: Path, size_mib: int) -> None:
    """A fresh ext4 in a sparse image file, mounted on `mnt`. The inode
    tables are written now (no lazy init in the background during the
    runs), with one inode per 4 KiB: seven snapshots of 54k entries each
    need more than the default."""
    unmount(mnt)
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(size_mib * rb.MiB)
    rb.run_cmd(["mkfs.ext4", "-q", "-F", "-i", "4096", "-E",
                "lazy_itable_init=0,lazy_journal_init=0,nodiscard", str(image)], timeout=300)
    mnt.mkdir(parents=True, exist_ok=True)
    rb.run_cmd(["mount", "-o", "loop", str(image), str(mnt)], timeout=60)


def unmount(mnt: Path) -> None:
    if os.path.ismount(mnt):
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=120)


@dataclass
class Usage:
    du_kib: int  # du -sk of the backup directory (hard links once)
    apparent: int  # du -s --apparent-size -B1
    fs_used: int  # statvfs: bytes in use on the file system
    fs_inodes: int  # statvfs: inodes in use


def usage(fs: Path, bk: Path) -> Usage:
    du = int(rb.run_cmd(["du", "-sk", str(bk)]).stdout.split()[0])
    app = int(rb.run_cmd(["du", "-s", "--apparent-size", "-B1", str(bk)]).stdout.split()[0])
    st = os.statvfs(fs)
    return Usage(du, app, (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_files - st.f_ffree)


@dataclass
class Walk:
    """One snapshot, entry by entry."""

    entries: dict[str, tuple]  # path -> (type, size, mode, mtime_ns, ino, nlink)
    dirs: int = 0
    dir_kib: int = 0  # blocks of its directories
    new_files: int = 0  # files no other snapshot shares (link count 1)
    new_bytes: int = 0
    new_kib: int = 0


def walk(top: Path) -> Walk:
    w = Walk({})
    for root, dirs, names in os.walk(top):
        for n in dirs + names:
            p = os.path.join(root, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, top)
            kind = "d" if os.path.isdir(p) and not os.path.islink(p) else \
                "l" if os.path.islink(p) else "f"
            w.entries[rel] = (kind, st.st_size if kind != "d" else 0, st.st_mode, st.st_mtime_ns,
                              st.st_ino, st.st_nlink)
            if kind == "d":
                w.dirs += 1
                w.dir_kib += st.st_blocks // 2
            elif kind == "f" and st.st_nlink == 1:
                w.new_files += 1
                w.new_bytes += st.st_size
                w.new_kib += st.st_blocks // 2
    return w


def check_snapshot(src: Walk, snap: Walk, prev: Walk | None, changed: set[str]) -> list[str]:
    """What is wrong with a snapshot: an entry missing, extra or differing
    from the source (type, size, mode; mtime for files), an unchanged file
    that is not the previous snapshot's inode, a changed one that is."""
    problems = []
    if src.entries.keys() != snap.entries.keys():
        missing = sorted(src.entries.keys() - snap.entries.keys())
        extra = sorted(snap.entries.keys() - src.entries.keys())
        problems.append(f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} extra (e.g. {extra[:2]})")
    for rel, (kind, size, mode, mtime, _, _) in src.entries.items():
        got = snap.entries.get(rel)
        if got is None:
            continue
        if got[0] != kind or got[2] != mode or (kind != "d" and got[1] != size):
            problems.append(f"{rel}: {got[:3]} != source {(kind, size, mode)}")
        elif kind == "f" and got[3] // 1000 != mtime // 1000:
            problems.append(f"{rel}: mtime {got[3]} != source {mtime}")
        if len(problems) > 5:
            break
    if prev is not None:
        not_linked = [r for r, e in snap.entries.items()
                      if e[0] == "f" and r not in changed and r in prev.entries and prev.entries[r][4] != e[4]]
        linked_changed = [r for r in changed if r in snap.entries and r in prev.entries
                          and prev.entries[r][4] == snap.entries[r][4]]
        if not_linked:
            problems.append(f"{len(not_linked)} unchanged file(s) not hard-linked to the previous "
                            f"snapshot (e.g. {not_linked[:2]})")
        if linked_changed:
            problems.append(f"{len(linked_changed)} changed file(s) still the previous snapshot's "
                            f"inode (e.g. {linked_changed[:2]})")
    return problems


def same_content(src: Path, snap: Path, rels: list[str]) -> list[str]:
    return [r for r in rels if (src / r).read_bytes() != (snap / r).read_bytes()]


# ---------------------------------------------------------------------------
# The tools
# ---------------------------------------------------------------------------


def ns(argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", NETNS, *argv]


def lo_bytes(pid: int) -> int:
    """Bytes sent on the loopback of the namespace `pid` lives in (every
    packet is counted once: loopback's tx equals its rx)."""
    for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    raise RunFailed(f"no lo in /proc/{pid}/net/dev")


@dataclass
class DayResult:
    seconds: float
    wire_tool: int  # the tool's own count (ferry: wire_bytes; rsync: sent + received)
    wire_ip: int  # IP bytes on the namespace's loopback, both directions
    files_sent: int


class Tool:
    name = "?"

    def __init__(self, ctx: "Ctx"):
        self.ctx = ctx
        self.fs = ctx.workdir / "mnt" / self.name
        self.image = ctx.workdir / f"{self.name}.ext4"
        self.server: Proc | None = None

    def log(self, what: str) -> Path:
        return self.ctx.logs / f"seq{self.ctx.seq}-{self.name}-{what}.log"

    def start(self) -> None:
        """A fresh file system and a server on it, for one sequence."""
        make_fs(self.image, self.fs, self.ctx.image_mib)
        (self.fs / "bk").mkdir()
        self.port = rb.free_port()
        self.server = rb.start_server(ns(self.server_argv()), self.port, self.log("server"))

    def stop(self) -> None:
        if self.server:
            self.server.stop()
            self.server = None
        unmount(self.fs)
        self.image.unlink(missing_ok=True)

    @property
    def bk(self) -> Path:
        """The directory that holds this tool's snapshots."""
        return self.fs / "bk"

    def snapshots(self) -> list[Path]:
        raise NotImplementedError

    def backup(self, day: int) -> DayResult:
        argv = self.client_argv(day)
        assert self.server
        before = lo_bytes(self.server.pid)
        t0 = time.perf_counter()
        client = Proc(ns(argv), self.log(f"day{day}-client"))
        status = client.wait(self.ctx.timeout)
        seconds = client.end - t0
        if status != 0:
            raise RunFailed(f"{self.name} day {day} exited with {status}: {client.log_tail()}")
        wire_ip = lo_bytes(self.server.pid) - before
        text = client.log_path.read_text(errors="replace")
        wire, sent = self.parse(text)
        return DayResult(seconds, wire, wire_ip, sent)


class Ferry(Tool):
    def __init__(self, ctx: "Ctx", tls: bool, baseline: bool = False):
        self.name = ("ferry-base" if baseline else "ferry") + ("" if tls else "-no-tls")
        self.tls = tls
        # --baseline: another build, run beside the one under test.
        self.binary = ctx.baseline if baseline else ctx.ferry
        super().__init__(ctx)

    def common(self) -> list[str]:
        return ["--state-dir", str(self.ctx.workdir / "ferry-state"),
                "--token-file", str(rb.bench_token(self.ctx.workdir))] + ([] if self.tls else ["--no-tls"])

    def server_argv(self) -> list[str]:
        return [str(self.binary), "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--root", str(self.fs)] + self.common()

    def client_argv(self, day: int) -> list[str]:
        # A snapshot is named by the second it was taken in: a second one
        # in the same second is refused, so wait for the next (untimed).
        last = getattr(self, "last_start", 0.0)
        if time.time() < int(last) + 1:
            time.sleep(int(last) + 1 - time.time() + 0.01)
        self.last_start = time.time()
        return [str(self.binary), "backup", str(self.ctx.src), f"127.0.0.1:bk/pylib",
                "-p", str(self.port), "--json"] + self.common()

    def parse(self, text: str) -> tuple[int, int]:
        for line in text.splitlines():
            if line.startswith("{") and '"summary"' in line:
                s = json.loads(line)
                return s["wire_bytes"], s["files_ok"] - s["files_unchanged"]
        raise RunFailed(f"{self.name}: no summary in its --json output")

    def snapshots(self) -> list[Path]:
        d = self.bk / "pylib"
        return sorted(p for p in d.iterdir() if not p.name.startswith(".") and p.name != "latest")

    def newest(self) -> Path:
        latest = self.bk / "pylib" / "latest"
        return latest.parent / os.readlink(latest)


class Rsync(Tool):
    name = "rsync"

    def server_argv(self) -> list[str]:
        conf = self.ctx.workdir / "etc" / f"rsyncd-{self.port}.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(
            f"port = {self.port}\n"
            "address = 127.0.0.1\n"
            # The default, and needed here: without a chroot the daemon
            # sanitizes paths, turns --link-dest=../DAY0 into DAY0 below the
            # destination, finds nothing there and sends every file whole,
            # with exit 0.
            "use chroot = yes\n"
            "reverse lookup = no\n"
            f"log file = {self.log('rsyncd')}\n"
            "[bk]\n"
            f"  path = {self.fs}\n"
            "  read only = false\n"
            "  uid = root\n"
            "  gid = root\n"
        )
        return ["rsync", "--daemon", "--no-detach", f"--config={conf}"]

    def client_argv(self, day: int) -> list[str]:
        # The usual snapshot recipe: a relative --link-dest is taken
        # relative to the destination directory, DAYn.
        link = [f"--link-dest=../DAY{day - 1}"] if day > 0 else []
        return ["rsync", "-a", "--stats", *link, f"{self.ctx.src}/",
                f"rsync://127.0.0.1:{self.port}/bk/bk/DAY{day}/"]

    def parse(self, text: str) -> tuple[int, int]:
        def num(label: str) -> int:
            for line in text.splitlines():
                if line.startswith(label):
                    return int(line.split(":", 1)[1].split()[0].replace(",", ""))
            raise RunFailed(f"rsync: no '{label}' in its --stats output")
        return (num("Total bytes sent") + num("Total bytes received"),
                num("Number of regular files transferred"))

    def snapshots(self) -> list[Path]:
        return sorted(self.bk.glob("DAY*"), key=lambda p: int(p.name[3:]))

    def newest(self) -> Path:
        return self.snapshots()[-1]


# ---------------------------------------------------------------------------
# The sequences
# ---------------------------------------------------------------------------


@dataclass
class Ctx:
    workdir: Path
    logs: Path
    ferry: Path
    src: Path
    timeout: float
    image_mib: int
    seq: int = 0
    baseline: Path | None = None


@dataclass
class Row:
    """One tool, one day, one sequence."""

    seq: int
    day: int
    tool: str
    order: int  # 0 if it went first that day
    seconds: float
    wire_tool: int
    wire_ip: int
    files_sent: int
    disk_kib: int  # du -sk growth of the backup directory
    apparent: int  # du --apparent-size growth
    fs_used: int  # statvfs growth
    fs_inodes: int
    new_files: int  # files of the new snapshot with link count 1
    new_kib: int
    dirs: int
    dir_kib: int
    leftovers: list[str] = field(default_factory=list)


@dataclass
class DayInfo:
    changed: int
    changed_bytes: int  # the new contents' bytes


def run_sequences(ctx: Ctx, pristine: Path, tools: list[Tool], days: int, fraction: float,
                  runs: int, loads: list[str]) -> tuple[list[Row], dict[int, DayInfo]]:
    files = regular_files(pristine)
    rows: list[Row] = []
    infos: dict[int, DayInfo] = {}
    for seq in range(1, runs + 1):
        ctx.seq = seq
        loads.append(f"sequence {seq} start: {load()}")
        rb.remove(ctx.src)
        rb.run_cmd(["cp", "-a", str(pristine), str(ctx.src)])
        for t in tools:
            t.start()
        try:
            prev: dict[str, Walk] = {}
            before = {t.name: usage(t.fs, t.bk) for t in tools}
            for day in range(days):
                changed = day_sample(files, day, fraction) if day else []
                changed_bytes = change_files(ctx.src, changed, day)
                infos[day] = DayInfo(len(changed), changed_bytes)
                src_walk = walk(ctx.src)
                shift = (seq - 1 + day) % len(tools)
                for order, t in enumerate(tools[shift:] + tools[:shift]):
                    os.sync()  # the previous tool's writeback is not this one's
                    r = t.backup(day)
                    os.sync()
                    after = usage(t.fs, t.bk)
                    newest = t.newest()
                    snap = walk(newest)
                    problems = check_snapshot(src_walk, snap, prev.get(t.name), set(changed))
                    problems += [f"content differs: {r}" for r in same_content(ctx.src, newest, changed)]
                    if problems:
                        raise RunFailed(f"{t.name} day {day}: snapshot {newest} is wrong: " + "; ".join(problems[:6]))
                    snaps = t.snapshots()
                    if len(snaps) != day + 1:
                        raise RunFailed(f"{t.name} day {day}: {len(snaps)} snapshots, expected {day + 1}")
                    leftovers = sorted(p.name for p in newest.parent.iterdir()
                                       if p not in snaps and p.name != "latest")
                    b = before[t.name]
                    row = Row(seq, day, t.name, order, r.seconds, r.wire_tool, r.wire_ip, r.files_sent,
                              after.du_kib - b.du_kib, after.apparent - b.apparent,
                              after.fs_used - b.fs_used, after.fs_inodes - b.fs_inodes,
                              snap.new_files, snap.new_kib, snap.dirs, snap.dir_kib, leftovers)
                    before[t.name] = after
                    prev[t.name] = snap
                    rows.append(row)
                    log(f"seq {seq} day {day} {t.name:<12} {r.seconds:7.3f} s  wire {r.wire_tool / 1e6:8.2f} MB"
                        f" (IP {r.wire_ip / 1e6:8.2f} MB)  disk +{row.disk_kib / 1024:7.1f} MiB"
                        f"  sent {r.files_sent} files" + (f"  leftovers {leftovers}" if leftovers else ""))
            # The last day's snapshot, byte for byte.
            for t in tools:
                r = subprocess.run(["diff", "-r", "-q", "--no-dereference", str(ctx.src), str(t.newest())],
                                   capture_output=True, text=True, timeout=ctx.timeout)
                if r.returncode != 0:
                    raise RunFailed(f"{t.name}: last snapshot differs from the source: {r.stdout[:300]}")
        finally:
            for t in tools:
                t.stop()
    loads.append(f"end: {load()}")
    return rows, infos


def load() -> str:
    return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mb(n: float) -> str:
    return f"{n / 1e6:,.2f}"


def mib_k(kib: float) -> str:
    return f"{kib / 1024:,.1f}"


def report(args, ctx: Ctx, tool_names: list[str], rows: list[Row], infos: dict[int, DayInfo],
           src_bytes: int, src_files: int, src_dirs: int, loads: list[str], started, elapsed: float,
           origin: str) -> str:
    by = {}
    for r in rows:
        by.setdefault((r.tool, r.day), []).append(r)
    days = sorted(infos)
    span = f"days 1-{days[-1]}"
    entries = src_files + src_dirs + 1  # the root too
    rsync = "rsync" if "rsync" in tool_names else None
    lines = [
        "# Daily backups: ferry backup vs rsync --link-dest",
        "",
        f"- date: {started.strftime('%Y-%m-%d %H:%M %Z').strip()}, {elapsed / 60:.1f} min in all",
        *[f"- machine: {m}" for m in rb.machine_info()],
        f"- ferry: {rb.ferry_version(ctx.ferry, origin)}; rsync: {rb.rsync_version()}",
        *([f"- ferry-base: {rb.ferry_version(ctx.baseline, f'binary {ctx.baseline}')}"] if ctx.baseline else []),
        f"- command: `{shlex.join(['python3', *sys.argv])}`",
        f"- source: pytree, {src_files:,} files in {src_dirs:,} directories, {src_bytes / 1e6:,.1f} MB;"
        f" day 0 backs it up in full, each of days 1-{days[-1]} first rewrites {args.fraction:.0%} of its files"
        f" (a deterministic sample per day, the same in every sequence) with new pseudo-random content"
        f" {GROWTH} bytes longer than before and a new mtime",
        f"- {args.runs} sequence(s) of {len(days)} days, each from scratch (fresh ext4 per tool,"
        f" {ctx.image_mib} MiB loop image in tmpfs, `-i 4096`); every day the tools back up the same"
        " source back to back, the first one rotating; medians over the sequences",
        "- wall time: from the start of the client to its exit (ferry: after the snapshot is published and"
        " `latest` switched; rsync: after the daemon's last acknowledgement). Servers run for the whole"
        " sequence, started before it",
        "- wire: the tool's own count (ferry's `--json` summary `wire_bytes`: protocol frames both ways,"
        " before TLS; rsync's `--stats` total bytes sent + received), and the IP bytes on the loopback"
        " of the bench's network namespace (headers, TLS and handshakes included)",
        "- disk: growth of `du -sk` over the tool's backup directory (hard links counted once) from the"
        " day before; `new files` are the new snapshot's files with link count 1, `dirs` its directories",
        "- every day each snapshot is checked against the source (every entry's type, size and mode,"
        " files' mtimes, the changed files' content; unchanged files must be the previous snapshot's"
        " inode, changed ones must not), and the last one of each sequence with `diff -r`",
    ]
    lines += [f"- {l}" for l in loads]
    lines.append("")

    # Summary: days 1.. medians.
    later = [d for d in days if d > 0]
    lines += ["## Summary", "",
              f"{span.capitalize()}: the median over every day and sequence; day 0 apart.", "",
              f"| tool | day 0 s | {span} s | wire MB/day | wire IP MB/day | wire beyond the changed bytes, per entry"
              " | disk MiB/day | new-file data MiB/day | dir blocks MiB/day | inodes/day |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    for name in tool_names:
        d0 = [r.seconds for r in by.get((name, 0), [])]
        rs = [r for d in later for r in by.get((name, d), [])]
        s = dict(d0=med(d0), t=med([r.seconds for r in rs]), wire=med([r.wire_tool for r in rs]),
                 ip=med([r.wire_ip for r in rs]), disk=med([r.disk_kib for r in rs]),
                 new=med([r.new_kib for r in rs]), dirs=med([r.dir_kib for r in rs]),
                 inodes=med([r.fs_inodes for r in rs]),
                 overhead=med([(r.wire_tool - infos[r.day].changed_bytes) / entries for r in rs]),
                 per_seq={q: med([r.seconds for r in rs if r.seq == q]) for q in range(1, args.runs + 1)})
        summary[name] = s
        lines.append(f"| {name} | {s['d0']:.2f} | {s['t']:.3f} | {mb(s['wire'])} | {mb(s['ip'])} | {s['overhead']:.0f} B"
                     f" | {mib_k(s['disk'])}"
                     f" | {mib_k(s['new'])} | {mib_k(s['dirs'])} | {s['inodes']:,.0f} |")
    cb = med([infos[d].changed_bytes for d in later]) if later else 0
    lines += ["", f"Changed per day (median of {span}): {med([infos[d].changed for d in later]):.0f} files,"
              f" {cb / 1e6:.2f} MB of new content. The tree has {entries:,} entries (files, directories, the root).", ""]
    if rsync:
        lines += [f"| ratio to rsync | day 0 time | {span} time | {span} time, each sequence | wire | disk |",
                  "|---|---:|---:|---|---:|---:|"]
        r = summary[rsync]
        for name in tool_names:
            if name == rsync:
                continue
            s = summary[name]
            each = ", ".join(f"{s['per_seq'][q] / r['per_seq'][q]:.2f}" for q in sorted(s["per_seq"]))
            lines.append(f"| {name} | {s['d0'] / r['d0']:.2f} | {s['t'] / r['t']:.2f} | {each} | {s['wire'] / r['wire']:.2f}"
                         f" | {s['disk'] / r['disk']:.2f} |")
        lines.append("")

    # Goals.
    lines += ["## Goals (issue 17)", "", "| goal | tool | measured | verdict |", "|---|---|---|---|"]
    for name in tool_names:
        if not name.startswith("ferry"):
            continue
        s = summary[name]
        extra = int(round(s["disk"] - s["new"] - s["dirs"]))
        ok = extra <= 4 * 4  # a few blocks of slack: the journal's, a directory that grew
        lines.append(f"| disk per snapshot ≤ changed bytes + metadata | {name} | {mib_k(s['disk'])} MiB ="
                     f" {mib_k(s['new'])} MiB new file data (changed {cb / 1e6:.2f} MB, in 4 KiB blocks)"
                     f" + {mib_k(s['dirs'])} MiB directories + {extra:,.0f} KiB else |"
                     f" {'PASS' if ok else 'FAIL'} |")
        if rsync:
            ratio = s["t"] / summary[rsync]["t"]
            lines.append(f"| wall time ≤ 0.7× rsync's ({span}) | {name} | {s['t']:.3f} s vs {summary[rsync]['t']:.3f} s"
                         f" = {ratio:.3f}× | {'PASS' if ratio <= 0.7 else 'FAIL'} |")
    lines.append("")

    # Per day.
    lines += ["## Per day (medians over the sequences)", "",
              "| day | changed files | changed MB | tool | s | wire MB | wire IP MB | disk MiB | new files | new-file MiB | dirs | dir MiB | inodes | files sent |",
              "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in days:
        for name in tool_names:
            rs = by.get((name, d), [])
            if not rs:
                continue
            lines.append(
                f"| {d} | {infos[d].changed} | {mb(infos[d].changed_bytes)} | {name} | {med([r.seconds for r in rs]):.3f}"
                f" | {mb(med([r.wire_tool for r in rs]))} | {mb(med([r.wire_ip for r in rs]))}"
                f" | {mib_k(med([r.disk_kib for r in rs]))} | {med([r.new_files for r in rs]):,.0f}"
                f" | {mib_k(med([r.new_kib for r in rs]))} | {med([r.dirs for r in rs]):,.0f}"
                f" | {mib_k(med([r.dir_kib for r in rs]))} | {med([r.fs_inodes for r in rs]):,.0f}"
                f" | {med([r.files_sent for r in rs]):,.0f} |")
    lines.append("")

    # Every run.
    lines += ["## Every run", "",
              "`order` 0: the tool went first that day. Wire in bytes, disk in KiB.", "",
              "| seq | day | tool | order | s | wire | wire IP | du KiB | apparent bytes | statvfs KiB | inodes | new files | new KiB | dirs | dir KiB |",
              "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.seq} | {r.day} | {r.tool} | {r.order} | {r.seconds:.3f} | {r.wire_tool:,} | {r.wire_ip:,}"
                     f" | {r.disk_kib:,} | {r.apparent:,} | {r.fs_used // 1024:,} | {r.fs_inodes:,} | {r.new_files:,}"
                     f" | {r.new_kib:,} | {r.dirs:,} | {r.dir_kib:,} |")
    lines.append("")
    return "\n".join(lines)




# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, help="sequences of days, each from scratch (default 3, 1 with --quick)")
    p.add_argument("--days", type=int, default=7, help="days per sequence, day 0 the full backup (default 7)")
    p.add_argument("--fraction", type=float, default=0.01, help="share of files changed each day (default 0.01)")
    p.add_argument("--tools", default="ferry,ferry-no-tls,rsync",
                   help="comma list of ferry, ferry-no-tls, rsync; ferry-base, ferry-base-no-tls with --baseline")
    p.add_argument("--quick", action="store_true", help="5000 files of the stdlib, one sequence: a smoke test")
    p.add_argument("--ferry", type=Path, help="use this ferry binary instead of building one")
    p.add_argument("--baseline", type=Path,
                   help="another ferry build, run beside the one under test as ferry-base (added to --tools)")
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm/ferry-bench-backup"), help="tmpfs work directory")
    p.add_argument("--image-mib", type=int, help="size of each tool's ext4 image (default 2048, 256 with --quick)")
    p.add_argument("--keep", action="store_true", help="keep the data set for the next run")
    p.add_argument("--timeout", type=float, default=rb.DEFAULT_TIMEOUT, help="seconds allowed per command")
    p.add_argument("--out", type=Path, help="report file (default bench/results/backup-DATE.md)")
    args = p.parse_args()
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.image_mib is None:
        args.image_mib = 256 if args.quick else 2048
    if args.runs < 1 or args.days < 1 or not 0 < args.fraction <= 1:
        p.error("--runs and --days must be at least 1, --fraction in (0, 1]")
    return args


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        raise BenchError("run as root: the bench mounts loop images and creates a network namespace")
    started = datetime.datetime.now().astimezone()
    t_start = time.perf_counter()
    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    known = ["ferry", "ferry-no-tls", "rsync"] + (["ferry-base", "ferry-base-no-tls"] if args.baseline else [])
    if args.baseline and not any(n.startswith("ferry-base") for n in names):
        names.insert(names.index("ferry") + 1 if "ferry" in names else 0, "ferry-base")
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise BenchError(f"unknown tools: {', '.join(unknown)} (known: {', '.join(known)})")
    if args.baseline and not os.access(args.baseline, os.X_OK):
        raise BenchError(f"--baseline {args.baseline} is not an executable")
    rb.install_missing({"rsync", "diff", "ip"} if "rsync" in names else {"diff", "ip"})
    for binary in ("mkfs.ext4", "mount", "du"):
        if not shutil.which(binary):
            raise BenchError(f"{binary} is missing")
    ferry, origin = rb.ferry_binary(args.ferry)

    workdir = args.workdir.resolve()
    data_dir = workdir / "data"
    logs = workdir / "logs"
    rb.remove(logs)
    for d in (data_dir, logs):
        d.mkdir(parents=True, exist_ok=True)
    spec = {"stdlib": str(rb.stdlib_dir()), "limit": 5000 if args.quick else None}
    need = rb.estimate_bytes("pytree", spec) * 2 + len(names) * args.image_mib * rb.MiB // 2
    rb.check_space(workdir, need)

    ctx = Ctx(workdir, logs, ferry, workdir / "src", args.timeout, args.image_mib,
              baseline=args.baseline.resolve() if args.baseline else None)
    loads: list[str] = []
    tools: list[Tool] = []
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    rb.run_cmd(["ip", "netns", "add", NETNS])
    try:
        rb.run_cmd(ns(["ip", "link", "set", "lo", "up"]))
        ds = rb.ensure_dataset(data_dir, "pytree", "tree", spec)
        for n in names:
            tls = not n.endswith("-no-tls")
            tools.append(Rsync(ctx) if n == "rsync" else Ferry(ctx, tls, baseline=n.startswith("ferry-base")))
        src_dirs = sum(len(d) for _, d, _ in os.walk(ds.path))
        rows, infos = run_sequences(ctx, ds.path, tools, args.days, args.fraction, args.runs, loads)
    finally:
        rb.kill_all_live()
        for t in tools:
            t.stop()
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
        rb.remove(ctx.src)
        if not args.keep:
            rb.remove(data_dir)

    text = report(args, ctx, names, rows, infos, ds.bytes, ds.files, src_dirs, loads, started,
                  time.perf_counter() - t_start, origin)
    rb.write_report(text, args.out or rb.REPO / "bench" / "results"
                    / f"backup-{started.strftime('%Y-%m-%d')}.md")
    return 0


if __name__ == "__main__":
    rb.run_main(main)
