#!/usr/bin/env python3
"""Delta transfer: ferry up against rsync's delta algorithm (issue 17).

    python3 bench/delta.py              # 3 cases on a 1 GiB file, 3 runs
    python3 bench/delta.py --quick      # smoke test: 64 MiB file, 1 run

The receiver holds the old version of a file of random bytes (seeded, so
the same on every machine and every run), and each tool sends the new one:

- `insert`: 4 KiB inserted at 1 MiB, then 100 scattered 4 KiB overwrites
  (the offsets of crates/ferry/tests/delta.rs);
- `grow`: the old file with 10 MB of new bytes appended;
- `new`: a file of the same size with nothing in common with the old one,
  so every byte goes, and what the delta algorithm costs shows.

Tools: `ferry up` (TLS, default options: delta on), `ferry up --no-tls`,
`rsync -a --no-whole-file` to an rsync daemon, and the whole-file baselines
`ferry up -W` (with and without TLS) and `rsync -a -W`. Servers and clients
run in a network namespace of the bench's own, on its loopback, whose
counters give the bytes on the wire beside each tool's own count.

Before every run the destination is reset to the old version (a full copy
with `cp --reflink=never`, its mtime set back to the old one's; untimed).
After every run the destination must equal the new version byte for byte
(`cmp`). Runs are interleaved: run 1 of every tool on every case, then run
2, the first tool rotating; the report shows medians and every run.

Python 3 standard library only; needs root (a network namespace). Helpers
come from bench/run.py. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as rb  # noqa: E402  (bench/run.py: processes, build, machine info)
from run import BenchError, Proc, RunFailed, log  # noqa: E402

NETNS = "ferrybench-delta"
MiB = rb.MiB
# The old version's mtime, and the new versions': different, so neither
# tool's quick check (size and mtime) can skip the file, even in `new`
# where the sizes are equal.
MTIME_OLD = 1_796_428_800  # 2026-12-05T00:00:00Z
MTIME_NEW = 1_796_515_200  # 2026-12-06T00:00:00Z
NAME = "disk.img"  # the file's name at the receiver
# Bump when the recipe of the data changes: the marker then no longer matches.
RECIPE = 1

CASES = ("insert", "grow", "new")
CASE_WHAT = {
    "insert": "4 KiB inserted at 1 MiB + 100 scattered 4 KiB overwrites",
    "grow": "10 MB appended",
    "new": "nothing in common (another random file of the same size)",
}
TOOLS = ("ferry", "ferry-no-tls", "rsync", "ferry-W", "ferry-no-tls-W", "rsync-W")
# Whom each tool's ratio is taken against: delta against rsync's delta,
# whole-file against rsync -W.
PEER = {"ferry": "rsync", "ferry-no-tls": "rsync", "ferry-W": "rsync-W", "ferry-no-tls-W": "rsync-W"}


# ---------------------------------------------------------------------------
# Data: deterministic random bytes
# ---------------------------------------------------------------------------


def write_random(f, rng: random.Random, n: int) -> None:
    while n:
        k = min(n, 8 * MiB)
        f.write(rng.randbytes(k))
        n -= k


def overwrite_offsets(size: int) -> list[int]:
    """Where the 100 overwrites of `insert` go: those of crates/ferry/tests/delta.rs."""
    return [(i * 10_007 + 3) * (size // 1_000_100) for i in range(100)]


def copy_range(src, dst, n: int) -> None:
    while n:
        b = src.read(min(n, 8 * MiB))
        if not b:
            raise BenchError("short read while deriving a data set")
        dst.write(b)
        n -= len(b)


def generate(data: Path, size: int) -> dict[str, Path]:
    """old.img and the new version of each case, reused while the marker
    (recipe and size) matches."""
    files = {"old": data / "old.img", **{c: data / f"{c}.img" for c in CASES}}
    marker = data / "data.json"
    spec = {"recipe": RECIPE, "size": size}
    try:
        saved = json.loads(marker.read_text())
        if saved["spec"] == spec and all(files[k].stat().st_size == saved["sizes"][k] for k in files):
            log(f"data: reusing {data}")
            return files
    except (OSError, ValueError, KeyError):
        pass
    marker.unlink(missing_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    log(f"data: generating {size / MiB:.0f} MiB old version and three new ones in {data} ...")
    with open(files["old"], "wb") as f:
        write_random(f, random.Random("ferry-bench-delta old"), size)
    # insert: 4 KiB at 1 MiB, then the overwrites on the new size.
    at = min(MiB, size // 2)
    with open(files["old"], "rb") as src, open(files["insert"], "wb") as dst:
        copy_range(src, dst, at)
        dst.write(random.Random("ferry-bench-delta insert").randbytes(4096))
        copy_range(src, dst, size - at)
    rng = random.Random("ferry-bench-delta overwrite")
    with open(files["insert"], "r+b") as f:
        for off in overwrite_offsets(size + 4096):
            f.seek(off)
            f.write(rng.randbytes(4096))
    # grow: 10 MB (10^6) of new bytes at the end.
    with open(files["old"], "rb") as src, open(files["grow"], "wb") as dst:
        copy_range(src, dst, size)
        write_random(dst, random.Random("ferry-bench-delta grow"), 10_000_000)
    with open(files["new"], "wb") as f:
        write_random(f, random.Random("ferry-bench-delta new"), size)
    for k, p in files.items():
        m = MTIME_OLD if k == "old" else MTIME_NEW
        os.chmod(p, 0o644)
        os.utime(p, (m, m))
    marker.write_text(json.dumps({"spec": spec, "sizes": {k: p.stat().st_size for k, p in files.items()}}))
    log(f"data: done in {time.perf_counter() - t:.1f} s")
    return files


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


def ns(argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", NETNS, *argv]


def lo_bytes(pid: int) -> int:
    """Bytes sent on the loopback of the namespace `pid` lives in (each
    packet once: loopback's tx equals its rx; headers included)."""
    for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    raise RunFailed(f"no lo in /proc/{pid}/net/dev")


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system time of `pid` and of its children it has reaped
    (an rsync daemon's connection handler)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK  # utime stime cutime cstime


def children(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except OSError:
        return False


def timed(argv: list[str], log_path: Path) -> list[str]:
    """argv under GNU time, which writes `maxrss_kib user sys` to log_path.time."""
    return [rb.GNU_TIME, "-f", "%M %U %S", "-o", str(log_path.with_suffix(".time")), *argv]


def read_time(log_path: Path) -> tuple[int, float]:
    """(peak RSS KiB, user + sys s) of a command run under `timed`."""
    try:
        rss, user, sys_ = log_path.with_suffix(".time").read_text().split()[-3:]
        return int(rss), float(user) + float(sys_)
    except (OSError, ValueError):
        return 0, float("nan")


@dataclass
class Result:
    case: str
    tool: str
    run: int
    order: int  # position of the tool in this run's rotation (0 = first)
    seconds: float
    wire_tool: int  # the tool's own count
    wire_ip: int  # loopback bytes in the namespace
    client_cpu: float
    server_cpu: float
    client_rss_kib: int
    server_rss_kib: int  # ferry only (VmHWM); 0 for rsync
    matched: int = -1  # rsync: "Matched data"; -1 where the tool does not say
    literal: int = -1  # rsync: "Literal data"


@dataclass
class Ctx:
    workdir: Path
    dst: Path
    logs: Path
    ferry: Path
    timeout: float


class Tool:
    def __init__(self, name: str):
        self.name = name
        self.whole = name.endswith("-W")
        self.rsync = name.startswith("rsync")
        self.tls = name.startswith("ferry") and "no-tls" not in name

    def run(self, ctx: Ctx, case: str, src: Path, run_no: int, order: int) -> Result:
        port = rb.free_port()
        stem = f"run{run_no}-{case}-{self.name}"
        if self.rsync:
            conf = ctx.workdir / "etc" / f"rsyncd-{port}.conf"
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(
                f"port = {port}\n"
                "address = 127.0.0.1\n"
                "use chroot = no\n"
                "reverse lookup = no\n"
                f"log file = {ctx.logs / 'rsyncd.log'}\n"
                "[bench]\n"
                f"  path = {ctx.dst}\n"
                "  read only = false\n"
                "  uid = root\n"
                "  gid = root\n"
            )
            server_argv = ["rsync", "--daemon", "--no-detach", f"--config={conf}"]
            # -a implies neither; --no-whole-file says in so many words that
            # the delta algorithm runs (the default with a daemon anyway).
            client_argv = ["rsync", "-a", "--stats", "-W" if self.whole else "--no-whole-file",
                           str(src), f"rsync://127.0.0.1:{port}/bench/{NAME}"]
        else:
            common = ["--state-dir", str(ctx.workdir / "ferry-state"),
                      "--token-file", str(rb.bench_token(ctx.workdir))] + ([] if self.tls else ["--no-tls"])
            server_argv = [str(ctx.ferry), "server", "--host", "127.0.0.1", "--port", str(port),
                           "--root", str(ctx.dst)] + common
            client_argv = [str(ctx.ferry), "up", str(src), NAME, "--host", "127.0.0.1",
                           "--port", str(port), "--json"] + common + (["-W"] if self.whole else [])
        server = rb.start_server(ns(server_argv), port, ctx.logs / f"{stem}-server.log")
        try:
            before = lo_bytes(server.pid)
            client_log = ctx.logs / f"{stem}-client.log"
            t0 = time.perf_counter()
            client = Proc(ns(timed(client_argv, client_log)), client_log)
            status = client.wait(ctx.timeout)
            seconds = client.end - t0
            if status != 0:
                raise RunFailed(f"{self.name} on {case} exited with {status}: {client.log_tail()}")
            # rsync's connection handler may outlive the client by a moment;
            # its CPU time reaches the daemon once the daemon has reaped it.
            deadline = time.monotonic() + 5
            while children(server.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            wire_ip = lo_bytes(server.pid) - before
            server_cpu = cpu_seconds(server.pid)
            server_rss = 0 if self.rsync else server.vmhwm_kib()
        finally:
            server.stop()
            if self.rsync:
                conf.unlink(missing_ok=True)
        rss, client_cpu = read_time(client_log)
        text = client_log.read_text(errors="replace")
        r = Result(case, self.name, run_no, order, seconds, 0, wire_ip, client_cpu, server_cpu, rss, server_rss)
        if self.rsync:
            r.wire_tool = stat_num(text, "Total bytes sent") + stat_num(text, "Total bytes received")
            r.matched = stat_num(text, "Matched data")
            r.literal = stat_num(text, "Literal data")
        else:
            summary = next((json.loads(l) for l in text.splitlines()
                            if l.startswith("{") and '"summary"' in l), None)
            if summary is None:
                raise RunFailed(f"{self.name}: no summary in its --json output")
            if summary.get("retries"):
                log(f"note: {self.name} on {case} run {run_no} retried {summary['retries']} time(s)")
            r.wire_tool = summary["wire_bytes"]
        return r


def stat_num(text: str, label: str) -> int:
    for line in text.splitlines():
        if line.startswith(label):
            return int(line.split(":", 1)[1].split()[0].replace(",", ""))
    raise RunFailed(f"rsync: no '{label}' in its --stats output")


def reset_destination(ctx: Ctx, old: Path) -> Path:
    """The receiver holds the old version: a full copy (no shared extents),
    with the old version's mode and mtime. Untimed."""
    rb.remove(ctx.dst)
    ctx.dst.mkdir(parents=True)
    dst = ctx.dst / NAME
    rb.run_cmd(["cp", "--reflink=never", "--preserve=mode,timestamps", str(old), str(dst)], timeout=ctx.timeout)
    return dst


def check_copy(src: Path, dst: Path, timeout: float) -> None:
    r = subprocess.run(["cmp", str(src), str(dst)], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RunFailed(f"destination differs from the source: {(r.stdout or r.stderr).strip()[:200]}")


def run_all(ctx: Ctx, files: dict[str, Path], cases: list[str], tools: list[Tool], runs: int) -> list[Result]:
    results: list[Result] = []
    for run_no in range(1, runs + 1):
        for ci, case in enumerate(cases):
            k = (run_no - 1 + ci) % len(tools)
            order = tools[k:] + tools[:k]
            for pos, tool in enumerate(order):
                reset_destination(ctx, files["old"])
                r = tool.run(ctx, case, files[case], run_no, pos)
                check_copy(files[case], ctx.dst / NAME, ctx.timeout)
                results.append(r)
                extra = f"  matched {r.matched / 1e6:.1f} MB literal {r.literal / 1e6:.1f} MB" if r.matched >= 0 else ""
                log(f"run {run_no} {case:<6} {tool.name:<15} {r.seconds:7.3f} s  wire {r.wire_tool:>13,}"
                    f"  IP {r.wire_ip:>13,}  cpu client {r.client_cpu:5.2f} s server {r.server_cpu:5.2f} s{extra}")
    return results


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(args, ctx: Ctx, origin: str, files: dict[str, Path], cases: list[str], tools: list[Tool],
           results: list[Result], loads: list[str], started, elapsed: float) -> str:
    names = [t.name for t in tools]
    sizes = {k: p.stat().st_size for k, p in files.items()}
    lines = [
        "# Delta transfer: ferry up vs rsync",
        "",
        f"- date: {started.strftime('%Y-%m-%d %H:%M %Z').strip()}, {elapsed / 60:.1f} min in all",
        *[f"- machine: {m}" for m in rb.machine_info()],
        f"- ferry: {rb.ferry_version(ctx.ferry, origin)}; rsync: {rb.rsync_version()}",
        f"- command: `{shlex.join(['python3', *sys.argv])}`",
        f"- old version: {sizes['old']:,} bytes of seeded random data; the receiver holds it before every run"
        " (`cp --reflink=never`, old mtime; untimed)",
        *[f"- case `{c}`: {CASE_WHAT[c]}; new version {sizes[c]:,} bytes" for c in cases],
        f"- {args.runs} interleaved run(s), the first tool rotating; medians; every copy checked with `cmp`",
        "- time: from the start of the client to its exit (ferry: after the server's verdict; rsync: after"
        " the daemon's last acknowledgement); servers start fresh for each run, before the clock",
        "- wire: the tool's own count (ferry's `--json` summary `wire_bytes`, protocol frames both ways"
        " before TLS; rsync's `--stats` total bytes sent + received) and the bytes on the loopback of the"
        " bench's network namespace (TLS, TCP/IP headers and handshakes included)",
        "- CPU: user + system seconds of the client (GNU time) and of the server (ferry server; rsync"
        " daemon with its connection handler), from /proc",
        "- bytes are deterministic; times are not: on a 2-core machine client and server share the cores,"
        " and other work on the machine moves them (load averages below)",
    ]
    lines += [f"- {l}" for l in loads]
    lines.append("")

    by: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        by.setdefault((r.case, r.tool), []).append(r)

    def m(case: str, tool: str, attr: str) -> float:
        return med([getattr(r, attr) for r in by.get((case, tool), [])])

    lines += ["## Medians", "",
              "`% of file`: wire bytes (the tool's count) over the new version's size. `time / peer`:"
              " ferry's median time over rsync's (delta) or rsync -W's (whole file); below 1, ferry is faster.",
              "", "| case | tool | wire (tool) | % of file | wire (IP) | wire / peer | s | min–max s | time / peer"
              " | CPU client s | CPU server s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        for n in names:
            rs = by.get((c, n), [])
            if not rs:
                continue
            peer = PEER.get(n)
            wr = tr = "–"
            if peer and by.get((c, peer)):
                wr = f"{m(c, n, 'wire_tool') / m(c, peer, 'wire_tool'):.2f}"
                tr = f"{m(c, n, 'seconds') / m(c, peer, 'seconds'):.2f}"
            secs = [r.seconds for r in rs]
            lines.append(f"| {c} | {n} | {m(c, n, 'wire_tool'):,.0f} | {100 * m(c, n, 'wire_tool') / sizes[c]:.2f}"
                         f" | {m(c, n, 'wire_ip'):,.0f} | {wr} | {med(secs):.2f} | {min(secs):.2f}–{max(secs):.2f}"
                         f" | {tr} | {m(c, n, 'client_cpu'):.2f} | {m(c, n, 'server_cpu'):.2f} |")
    lines.append("")
    rs_rows = [r for r in results if r.matched >= 0]
    if rs_rows:
        lines += ["rsync's own account (`--stats`, medians): matched and literal data.", "",
                  "| case | tool | matched | literal |", "|---|---|---:|---:|"]
        for c in cases:
            for n in names:
                rr = [r for r in by.get((c, n), []) if r.matched >= 0]
                if rr:
                    lines.append(f"| {c} | {n} | {med([r.matched for r in rr]):,.0f} | {med([r.literal for r in rr]):,.0f} |")
        lines.append("")

    lines += ["## Every run", "", "`order` 0: the tool went first in that run of that case. Peak RSS in MiB"
              " (server: ferry's VmHWM).", "",
              "| run | case | tool | order | s | wire (tool) | wire (IP) | CPU client | CPU server | RSS client | RSS server |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.run} | {r.case} | {r.tool} | {r.order} | {r.seconds:.3f} | {r.wire_tool:,} | {r.wire_ip:,}"
                     f" | {r.client_cpu:.2f} | {r.server_cpu:.2f} | {r.client_rss_kib / 1024:.0f}"
                     f" | {r.server_rss_kib / 1024:.0f} |")
    lines.append("")
    return "\n".join(lines)




def load() -> str:
    return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, help="interleaved runs (default 3, 1 with --quick)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--tools", default=",".join(TOOLS), help=f"comma list of {', '.join(TOOLS)}")
    p.add_argument("--size-mib", type=int, help="size of the old version (default 1024, 64 with --quick)")
    p.add_argument("--quick", action="store_true", help="64 MiB, one run: a smoke test")
    p.add_argument("--ferry", type=Path, help="use this ferry binary instead of building one")
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm/ferry-bench-delta"), help="tmpfs work directory")
    p.add_argument("--keep", action="store_true", help="keep the data for the next run")
    p.add_argument("--timeout", type=float, default=rb.DEFAULT_TIMEOUT, help="seconds allowed per command")
    p.add_argument("--out", type=Path, help="report file (default bench/results/delta-DATE.md)")
    args = p.parse_args()
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.size_mib is None:
        args.size_mib = 64 if args.quick else 1024
    if args.runs < 1 or args.size_mib < 4:
        p.error("--runs must be at least 1 and --size-mib at least 4")
    return args


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        raise BenchError("run as root: the bench creates a network namespace")
    started = datetime.datetime.now().astimezone()
    t_start = time.perf_counter()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    bad = [c for c in cases if c not in CASES] + [n for n in names if n not in TOOLS]
    if bad or not cases or not names:
        raise BenchError(f"unknown cases or tools: {', '.join(bad)} (cases: {', '.join(CASES)};"
                         f" tools: {', '.join(TOOLS)})")
    rb.install_missing({"ip", "cmp", "time"} | ({"rsync"} if any(n.startswith("rsync") for n in names) else set()))
    ferry, origin = rb.ferry_binary(args.ferry)

    workdir = args.workdir.resolve()
    data = workdir / ("data-quick" if args.quick else "data")
    logs = workdir / "logs"
    rb.remove(logs)
    logs.mkdir(parents=True, exist_ok=True)
    size = args.size_mib * MiB
    # The old version and three new ones, then the destination and the
    # receiver's new copy beside it during a run.
    rb.check_space(workdir, (0 if (data / "data.json").exists() else 4 * size) + 2 * size)
    ctx = Ctx(workdir, workdir / "dst", logs, ferry, args.timeout)
    tools = [Tool(n) for n in names]
    loads = [f"start: {load()}"]
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    rb.run_cmd(["ip", "netns", "add", NETNS])
    try:
        rb.run_cmd(ns(["ip", "link", "set", "lo", "up"]))
        files = generate(data, size)
        loads.append(f"before the runs: {load()}")
        results = run_all(ctx, files, cases, tools, args.runs)
        loads.append(f"after the runs: {load()}")
        text = report(args, ctx, origin, files, cases, tools, results, loads, started,
                      time.perf_counter() - t_start)
    finally:
        rb.kill_all_live()
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
        rb.remove(ctx.dst)
        if not args.keep:
            rb.remove(data)
    rb.write_report(text, args.out or rb.REPO / "bench" / "results"
                    / f"delta-{started.strftime('%Y-%m-%d')}.md")
    return 0


if __name__ == "__main__":
    rb.run_main(main)
