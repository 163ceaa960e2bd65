#!/usr/bin/env python3
"""ferry over an emulated WAN against rsync, tar|socat and scp (issue 19).

    python3 bench/wan.py             # every case, 3 interleaved runs (~30 min)
    python3 bench/wan.py --quick     # smoke test: small data sets, 1 run (~3 min)
    python3 bench/wan.py --cases latency,text-50ms --runs 5

The link is ../shared/wan (the `wan` emulator beside this repository, or
$WAN_SH): two network namespaces, wcli (10.79.0.2, the clients) and wsrv
(10.79.0.1, the servers), joined through a TUN device by a user-space
bottleneck model with rate, RTT, drop-tail queue and random loss. Before
every timed transfer the emulator is (re)started with the case's shape, so
its counters (queue drops, random losses, deepest queue, TUN drops) belong
to that one transfer, and the TCP metrics cache of both namespaces is
flushed, so no connection inherits what the previous tool's learned.

Cases (issue 19's table): 300 MB of random data in one file over 100 Mbit/s
50 ms, 100 Mbit/s 100 ms 0.5% loss and 1 Gbit/s 20 ms; 200 MB of real text
over 100 Mbit/s 50 ms (rsync -az, ferry's default --compress auto); 3,000
files of ~99.5 MB over 100 Mbit/s 100 ms 0.5% loss; and the latency of a
10 KB upload at 100 ms RTT. Beside them, reno-lossy: 100 MB over the lossy
path with ferry's connections on Reno (FERRY_TCP_CONGESTION), widening on
its own against 2 and 8 fixed connections: what --streams' widening is for.

Runs are interleaved: run 1 of every case and tool, then run 2, ...; within
a case the first tool rotates from run to run. The report gives medians,
ratios to ferry and every run's time.

Python 3 standard library only; needs root. The processes, data sets, the
ferry build and the rsync daemon come from bench/run.py. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as rb  # noqa: E402  (bench/run.py: processes, data sets, build, tools)
from run import BenchError, Proc, RunFailed, log  # noqa: E402

WAN_SH = Path(os.environ.get("WAN_SH", rb.REPO.parent / "shared" / "wan" / "wan.sh"))
NS_CLI, NS_SRV = "wcli", "wsrv"
SRV_IP = "10.79.0.1"
WAN = rb.Net("wan", SRV_IP, ("ip", "netns", "exec", NS_CLI), ("ip", "netns", "exec", NS_SRV))
# TCP payload per IP byte at MTU 1500 with timestamps: 1448 / 1500.
PAYLOAD_SHARE = 1448 / 1500


# ---------------------------------------------------------------------------
# The link
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    rate: float  # Mbit/s
    rtt: float  # ms
    loss: float  # percent
    queue: float | None = None  # ms; None: wan.sh's default (one BDP, at least 50 ms)

    def args(self) -> list[str]:
        a = [f"{self.rate:g}", f"{self.rtt:g}", f"{self.loss:g}"]
        return a + ([f"{self.queue:g}"] if self.queue is not None else [])

    def __str__(self) -> str:
        rate = f"{self.rate / 1000:g} Gbit/s" if self.rate >= 1000 else f"{self.rate:g} Mbit/s"
        return f"{rate}, {self.rtt:g} ms RTT, {self.loss:g}% loss"

    def payload_seconds(self, nbytes: int) -> float:
        """What the link itself needs for `nbytes` of TCP payload."""
        return nbytes * 8 / (self.rate * 1e6 * PAYLOAD_SHARE)


def wan(*args: str, timeout: float = 60) -> str:
    return rb.run_cmd([str(WAN_SH), *args], timeout=timeout).stdout


def wan_status() -> str | None:
    """The emulator's current settings line, or None if it is down."""
    r = subprocess.run([str(WAN_SH), "status"], capture_output=True, text=True, timeout=30)
    return r.stdout.strip() if r.returncode == 0 else None


def reshape(shape: Shape) -> str:
    """(Re)start the emulator with `shape`: fresh counters for one transfer.
    Returns its settings line."""
    line = wan("up", *shape.args()).strip()
    for ns in (NS_CLI, NS_SRV):
        subprocess.run(["ip", "-n", ns, "tcp_metrics", "flush", "all"], capture_output=True, timeout=30)
    return line


STAT_RE = re.compile(
    r"wanem: (up|down)\s+in (\d+) pkts (\d+) B \| out (\d+) pkts (\d+) B \| drop queue (\d+) "
    r"loss (\d+) \(([\d.]+)%\) nomem (\d+) txerr (\d+) \| max queue ([\d.]+) ms")
TUN_RE = re.compile(r"tun (\w+): tx dropped (\d+)")


@dataclass
class LinkStats:
    """The emulator's counters for one transfer, both directions."""

    pkts: dict[str, int] = field(default_factory=dict)  # "up" (client to server), "down"
    ip_bytes: dict[str, int] = field(default_factory=dict)
    queue_drops: dict[str, int] = field(default_factory=dict)
    losses: dict[str, int] = field(default_factory=dict)
    max_queue_ms: dict[str, float] = field(default_factory=dict)
    tun_drops: int = 0  # packets the TUNs dropped before the emulator read them (must be 0)
    emu_errors: int = 0  # the emulator's nomem + txerr (must be 0)

    @property
    def wire_bytes(self) -> int:
        return sum(self.ip_bytes.values())


def read_stats() -> tuple[dict, dict[str, int]]:
    text = wan("stats")
    dirs = {}
    for m in STAT_RE.finditer(text):
        d = m.group(1)
        dirs[d] = dict(pkts=int(m.group(2)), bytes=int(m.group(3)), drops=int(m.group(6)),
                       loss=int(m.group(7)), other=int(m.group(9)) + int(m.group(10)),
                       maxq=float(m.group(11)))
    tun = {m.group(1): int(m.group(2)) for m in TUN_RE.finditer(text)}
    if set(dirs) != {"up", "down"}:
        raise BenchError(f"cannot read the emulator's counters: {text.strip()[:300]}")
    return dirs, tun


def link_stats(tun_before: dict[str, int]) -> LinkStats:
    dirs, tun = read_stats()
    s = LinkStats()
    for d, v in dirs.items():
        s.pkts[d], s.ip_bytes[d] = v["pkts"], v["bytes"]
        s.queue_drops[d], s.losses[d], s.max_queue_ms[d] = v["drops"], v["loss"], v["maxq"]
        s.emu_errors += v["other"]
    s.tun_drops = sum(tun.get(k, 0) - tun_before.get(k, 0) for k in tun)
    return s


def foreign_pids(mine: set[int]) -> list[str]:
    """Processes in the two namespaces that this bench did not start (another
    user of the emulator: a re-shape would disturb it, and it us)."""
    out = []
    for ns in (NS_CLI, NS_SRV):
        r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
        for pid in r.stdout.split():
            if int(pid) in mine:
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.strip():  # an empty command line: a process exiting
                out.append(f"{ns}: {pid} {cmd.strip()[:120]}")
    return out


# ---------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------


def gen_files(path: Path, count: int, total: int, per_dir: int = 100) -> None:
    """`count` files of random bytes, `total` bytes in all, sizes spread
    log-normally (median ~20 KB, a few of several hundred KB), as in a
    source or photo tree; the same on every machine (seeded)."""
    rng = random.Random(19)
    raw = [rng.lognormvariate(0, 1) for _ in range(count)]
    scale = total / sum(raw)
    sizes = [max(1, int(x * scale)) for x in raw]
    sizes[-1] += total - sum(sizes)
    path.mkdir(parents=True)
    for i, size in enumerate(sizes):
        sub = path / f"d{i // per_dir:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i:04d}.bin").write_bytes(rng.randbytes(size))


def gen(name: str, path: Path, spec: dict) -> None:
    if name.startswith("random"):
        rb.gen_random_file(path, spec["size"])
    elif name == "text":
        rb.gen_text_file(path, spec["size"])
    elif name == "files":
        gen_files(path, spec["count"], spec["size"])
    elif name == "small":
        path.write_bytes(random.Random(10).randbytes(spec["size"]))
    else:
        raise BenchError(f"unknown data set {name}")


def ensure(data_dir: Path, name: str, kind: str, spec: dict) -> rb.Dataset:
    """As run.py's ensure_dataset: generate, or reuse if the marker matches."""
    import json

    path, marker = data_dir / name, data_dir / f"{name}.json"
    if marker.exists() and path.exists():
        try:
            saved = json.loads(marker.read_text())
            if saved["spec"] == spec and rb.tree_stats(path) == (saved["bytes"], saved["files"]):
                log(f"data set {name}: reusing {path}")
                return rb.Dataset(name, kind, path, spec, WAN, saved["bytes"], saved["files"])
        except (ValueError, KeyError, OSError):
            pass
    log(f"data set {name}: generating in {path} ...")
    marker.unlink(missing_ok=True)
    rb.remove(path)
    gen(name, path, spec)
    size, count = rb.tree_stats(path)
    marker.write_text(json.dumps({"spec": spec, "bytes": size, "files": count}))
    log(f"data set {name}: {size / 1e6:.1f} MB in {count} file(s)")
    return rb.Dataset(name, kind, path, spec, WAN, size, count)


def dataset_specs(quick: bool) -> dict[str, tuple[str, dict]]:
    return {
        "random": ("file", {"size": 20_000_000 if quick else 300_000_000}),
        "random100": ("file", {"size": 10_000_000 if quick else 100_000_000}),
        "text": ("file", {"size": 10_000_000 if quick else 200_000_000}),
        "files": ("tree", {"count": 300 if quick else 3000, "size": 9_950_000 if quick else 99_500_000}),
        "small": ("file", {"size": 10_000}),
    }


# ---------------------------------------------------------------------------
# Tools over the link. ferry and the rsync daemon are run.py's, placed in the
# namespaces by the data set's Net; tar|socat and scp need their own here
# (run.py's use 127.0.0.1).
# ---------------------------------------------------------------------------


class TarSocat(rb.Tool):
    name = "tar|socat"

    def run(self, ctx: rb.Ctx, ds: rb.Dataset) -> rb.RunResult:
        port = rb.free_port()
        dst = ctx.dst_root / ds.name
        dst.mkdir()
        if ds.kind == "file":
            what, landed = f"-C {shlex.quote(str(ds.path.parent))} {shlex.quote(ds.path.name)}", dst / ds.path.name
        else:
            what, landed = f"-C {shlex.quote(str(ds.path))} .", dst
        recv = (f"set -o pipefail; socat -u TCP-LISTEN:{port},reuseaddr,bind={SRV_IP} STDOUT"
                f" | tar -x -C {shlex.quote(str(dst))}")
        send = f"set -o pipefail; tar -c {what} | socat -u STDIN TCP:{SRV_IP}:{port}"
        receiver = rb.start_server(WAN.server(["bash", "-c", recv]), port, self.log_path(ctx, ds, "receiver"))
        try:
            t0 = time.perf_counter()
            sender = Proc(WAN.client(["bash", "-c", send]), self.log_path(ctx, ds, "sender"))
            rb.check_exit(sender, "tar|socat sender", ctx.timeout)
            rb.check_exit(receiver, "socat|tar receiver", ctx.timeout)
        finally:
            receiver.stop()
        return rb.RunResult(receiver.end - t0, landed)


class Scp(rb.Tool):
    """scp (OpenSSH 9: SFTP underneath) to an sshd of our own in wsrv, key auth."""

    name = "scp"

    def __init__(self, tree_cap: float):
        self.tree_cap = tree_cap

    def prepare(self, ctx: rb.Ctx) -> None:
        etc = ctx.workdir / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        self.host_key, self.client_key = etc / "ssh_host_ed25519_key", etc / "client_ed25519_key"
        for key in (self.host_key, self.client_key):
            if not key.exists():
                rb.run_cmd(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], timeout=30)
        (etc / "authorized_keys").write_text(Path(f"{self.client_key}.pub").read_text())
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.port = 2222
        self.config = etc / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress {SRV_IP}\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {etc / 'authorized_keys'}\nPermitRootLogin yes\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            # No DNS inside the namespaces; /dev/shm is world-writable.
            "UsePAM no\nUseDNS no\nStrictModes no\n"
            f"PidFile {etc / 'sshd-wan.pid'}\nSubsystem sftp internal-sftp\nLogLevel ERROR\n")
        rb.run_cmd([rb.sshd_path(), "-t", "-f", str(self.config)], timeout=30)

    def run(self, ctx: rb.Ctx, ds: rb.Dataset) -> rb.RunResult:
        sshd = rb.start_server(WAN.server([rb.sshd_path(), "-D", "-f", str(self.config), "-E",
                                           str(self.log_path(ctx, ds, "sshd-E"))]),
                               self.port, self.log_path(ctx, ds, "sshd"))
        try:
            argv = ["scp", "-q", "-r", "-P", str(self.port), "-i", str(self.client_key),
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                    str(ds.path), f"root@{SRV_IP}:{ctx.dst_root / ds.name}"]
            t0 = time.perf_counter()
            client = Proc(WAN.client(argv), self.log_path(ctx, ds, "client"))
            cap = self.tree_cap if ds.kind == "tree" else ctx.timeout
            try:
                status = client.wait(cap)
            except RunFailed as e:
                raise Capped(cap, ctx.dst_root / ds.name) from e
            if status != 0:
                raise RunFailed(f"scp exited with {status}: {client.log_tail()}")
        finally:
            # sshd's per-connection processes start sessions of their own:
            # stopping sshd's group leaves them (after a capped run, still
            # writing into the destination), so they are found and killed.
            children = descendants(sshd.pid)
            sshd.stop()
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return rb.RunResult(client.end - t0, ctx.dst_root / ds.name)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, read from /proc."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                # The command name, in parentheses, may hold spaces: ppid
                # is the second field after the last ')'.
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


class Capped(Exception):
    """A run stopped at its cap: how far it got is reported, not a time."""

    def __init__(self, cap: float, landed: Path):
        super().__init__(f"stopped at the cap of {cap:.0f} s")
        self.cap = cap
        self.landed = landed


RENO = {"FERRY_TCP_CONGESTION": "reno"}


def make_tools(scp_cap: float) -> dict[str, rb.Tool]:
    tools = [rb.Ferry(), rb.Ferry(name="ferry-no-tls", tls=False), rb.Rsync(compress=False),
             rb.Rsync(compress=True), TarSocat(), Scp(scp_cap),
             # The Reno case: ferry's connections on a loss-based congestion
             # control, widening on its own, and at 2 and 8 connections.
             rb.Ferry(name="ferry-reno", env=RENO),
             rb.Ferry(name="ferry-reno-2", env=RENO, streams=2),
             rb.Ferry(name="ferry-reno-8", env=RENO, streams=8)]
    return {t.name: t for t in tools}


TOOL_ALIASES = {"tar": "tar|socat", "rsync-z": "rsync -z", "rsync-az": "rsync -z"}


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    data: str  # data set
    shape: Shape
    tools: list[str]
    what: str
    runs: int = 0  # set from the options
    latency: bool = False
    reno: bool = False


def make_cases() -> list[Case]:
    five = ["ferry", "ferry-no-tls", "rsync", "tar|socat", "scp"]
    return [
        Case("random-50ms", "random", Shape(100, 50, 0), five, "random data, one file"),
        Case("random-lossy", "random", Shape(100, 100, 0.5), five, "random data, one file"),
        Case("random-1g", "random", Shape(1000, 20, 0), five, "random data, one file"),
        # rsync -az and ferry's default compression; tar|socat as the
        # uncompressed reference (what the link needs for the raw bytes).
        Case("text-50ms", "text", Shape(100, 50, 0), ["ferry", "ferry-no-tls", "rsync -z", "tar|socat"],
             "real text, one file"),
        Case("files-lossy", "files", Shape(100, 100, 0.5), five, "files of random data"),
        Case("latency", "small", Shape(100, 100, 0), five, "one file", latency=True),
        # What widening is for: a host whose congestion control is loss-based
        # (ferry only: the others take the namespaces' BBR, which this
        # machine does not let a namespace change).
        Case("reno-lossy", "random100", Shape(100, 100, 0.5), ["ferry-reno", "ferry-reno-2", "ferry-reno-8"],
             "random data, one file, ferry's connections on Reno", reno=True),
    ]


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------


@dataclass
class Series:
    seconds: list[float] = field(default_factory=list)
    every: list[str] = field(default_factory=list)  # each run in order, as shown
    stats: list[LinkStats] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    capped: list[str] = field(default_factory=list)

    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds and not self.failures else None


def count_files(path: Path) -> tuple[int, int]:
    try:
        return rb.tree_stats(path) if path.exists() else (0, 0)
    except OSError:
        return 0, 0


def one_run(ctx: rb.Ctx, case: Case, ds: rb.Dataset, tool: rb.Tool, series: Series, label: str,
            mine: set[int], notes: list[str]) -> None:
    rb.remove(ctx.dst_root)  # not timed
    ctx.dst_root.mkdir(parents=True)
    for f in foreign_pids(mine):
        note = f"another process used the emulator's namespaces during the runs: {f}"
        if note not in notes:
            notes.append(note)
            log(f"note: {note}")
    settings = reshape(case.shape)
    if settings and settings not in case_settings.setdefault(case.name, []):
        case_settings[case.name].append(settings)
    _, tun_before = read_stats()
    try:
        try:
            r = tool.run(ctx, ds)
        finally:
            st = link_stats(tun_before)
            series.stats.append(st)
        rb.verify(ds.path, r.landed, ds.kind, ctx.timeout)
    except Capped as c:
        got_bytes, got_files = count_files(c.landed)
        msg = (f"> {c.cap:.0f} s (stopped; {got_files:,} of {ds.files:,} files, "
               f"{got_bytes / 1e6:.1f} of {ds.bytes / 1e6:.1f} MB had arrived")
        if got_files:
            msg += f"; at that pace all would take ~{c.cap * ds.files / got_files:,.0f} s"
        msg += ")"
        series.capped.append(msg)
        series.every.append(f">{c.cap:.0f}")
        log(f"{label} {msg}")
        return
    except RunFailed as e:
        series.failures.append(str(e))
        series.every.append("FAILED")
        log(f"{label} FAILED: {e}")
        return
    finally:
        rb.remove(ctx.dst_root)
    series.seconds.append(r.seconds)
    # A run in which the TUNs dropped packets the emulator did not read in
    # time (losses the model did not make) is marked.
    series.every.append((f"{r.seconds:.3f}" if case.latency else f"{r.seconds:.2f}")
                        + ("*" if st.tun_drops or st.emu_errors else ""))
    drops = sum(st.queue_drops.values())
    losses = sum(st.losses.values())
    log(f"{label} {r.seconds:8.3f} s  {ds.bytes / 1e6 / r.seconds:7.1f} MB/s  IP {st.wire_bytes / 1e6:7.1f} MB"
        f"  drops {drops} loss {losses} maxq {max(st.max_queue_ms.values()):.0f} ms tun {st.tun_drops}")


case_settings: dict[str, list[str]] = {}


def busy_benches() -> list[str]:
    r = subprocess.run(["pgrep", "-af", r"backup\.py|delta\.py"], capture_output=True, text=True)
    return [l for l in r.stdout.splitlines() if "pgrep" not in l]


def run_all(ctx: rb.Ctx, cases: list[Case], datasets: dict[str, rb.Dataset], tools: dict[str, rb.Tool],
            args, notes: list[str]) -> dict:
    results: dict[tuple[str, str], Series] = {}
    mine: set[int] = set()
    runs = max(c.runs for c in cases)
    for run_no in range(1, runs + 1):
        ctx.run_no = run_no
        others = busy_benches()
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        notes.append(f"run {run_no} start: load average {load}; other benchmarks running: "
                     + ("; ".join(o[:100] for o in others) if others else "none"))
        log(f"--- run {run_no}/{runs} ({notes[-1]})")
        for case in cases:
            if run_no > case.runs:
                continue
            names = case.tools
            shift = (run_no - 1) % len(names)
            for name in names[shift:] + names[:shift]:
                if name == "scp" and datasets[case.data].kind == "tree" and run_no > args.scp_tree_runs:
                    continue
                series = results.setdefault((case.name, name), Series())
                label = f"run {run_no}/{runs} {case.name:<13} {name:<13}"
                mine = {p.pid for p in rb._live}
                one_run(ctx, case, datasets[case.data], tools[name], series, label, mine, notes)
    return results


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def machine() -> list[str]:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) / 1024 / 1024 for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal:")), 0)
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    cc = subprocess.run(["ip", "netns", "exec", NS_CLI, "sysctl", "-n", "net.ipv4.tcp_congestion_control"],
                        capture_output=True, text=True).stdout.strip() or "?"
    return [f"nproc {nproc}, {cpu}, {mem:.1f} GiB RAM, Linux {os.uname().release}",
            f"TCP congestion control in the namespaces: {cc} (the kernel's default; no fq qdisc, BBR paces itself)"]


def tool_versions() -> str:
    def line(argv: list[str], pick: str = "") -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        lines = (r.stdout + r.stderr).strip().splitlines()
        return next((l.strip() for l in lines if pick in l), "?")
    return "; ".join([line(["rsync", "--version"], "version"), line(["ssh", "-V"]),
                      line(["socat", "-V"], "socat version"), line(["tar", "--version"])])


def fmt_ratio(t: float | None, ferry: float | None) -> str:
    if t is None or not ferry:
        return "–"
    return f"{t / ferry:.2f}"


def case_table(case: Case, ds: rb.Dataset, results: dict) -> list[str]:
    ferry_s = results.get((case.name, "ferry"), Series()).median()
    link_s = case.shape.payload_seconds(ds.bytes)
    lines = [f"### {case.name}: {describe(case, ds)}; {case.shape}", ""]
    if not case.latency:
        lines += [f"The link itself needs {link_s:.1f} s for these bytes as TCP payload "
                  f"({PAYLOAD_SHARE * 100:.1f}% of {case.shape.rate:g} Mbit/s).", ""]
        lines += ["| tool | median s | MB/s | tool / ferry | median / link time | every run, s (run order) "
                  "| IP MB on the link (median) | runs |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    else:
        lines += ["| tool | median s | median / RTT | tool / ferry | min–max s | every run, s (run order) | runs |",
                  "|---|---:|---:|---:|---:|---|---:|"]
    for name in case.tools:
        s = results.get((case.name, name))
        if s is None:
            continue
        total = len(s.every)
        every = ", ".join(s.every)
        wire = statistics.median([x.wire_bytes for x in s.stats]) / 1e6 if s.stats else 0
        tool = rb.md_escape(name if not (name == "rsync -z") else "rsync -az")
        if s.failures:
            lines.append(f"| {tool} | FAILED | – | – | – | {every} | – | {len(s.seconds)}/{total} ok: "
                         f"{rb.md_escape(s.failures[0][:160])} |")
            continue
        if not s.seconds:
            lines.append(f"| {tool} | {rb.md_escape(s.capped[0])} | – | – | – | {every} | {wire:,.1f} | 0/{total} |")
            continue
        med = s.median()
        if case.latency:
            lines.append(f"| {tool} | {med:.3f} | {med / (case.shape.rtt / 1000):.1f} | {fmt_ratio(med, ferry_s)} "
                         f"| {min(s.seconds):.3f}–{max(s.seconds):.3f} | {every} | {len(s.seconds)} |")
        else:
            cap = f" ({len(s.capped)} capped)" if s.capped else ""
            lines.append(f"| {tool} | {med:.2f} | {ds.bytes / 1e6 / med:.1f} | {fmt_ratio(med, ferry_s)} "
                         f"| {med / link_s:.2f} | {every} | {wire:,.1f} | {len(s.seconds)}{cap} |")
    lines += ["", "Emulator counters, summed over the runs (up = client to server; loss = random losses "
              "the model applied / packets put on the link; queue drops = drop-tail; TUN drops must be 0, "
              "a run with any is marked * above):", "",
              "| tool | packets up / down | queue drops up / down | random losses up / down (applied %) "
              "| deepest queue ms | TUN drops |", "|---|---:|---:|---:|---:|---:|"]
    for name in case.tools:
        s = results.get((case.name, name))
        if s is None or not s.stats:
            continue
        pk = {d: sum(x.pkts.get(d, 0) for x in s.stats) for d in ("up", "down")}
        dr = {d: sum(x.queue_drops.get(d, 0) for x in s.stats) for d in ("up", "down")}
        lo = {d: sum(x.losses.get(d, 0) for x in s.stats) for d in ("up", "down")}
        on_link = {d: pk[d] - dr[d] for d in pk}  # what went onto the link, as wanem counts it
        pct = " / ".join(f"{100 * lo[d] / on_link[d]:.2f}" if on_link[d] else "0" for d in ("up", "down"))
        mq = max(max(x.max_queue_ms.values()) for x in s.stats)
        tun = sum(x.tun_drops for x in s.stats)
        errs = sum(x.emu_errors for x in s.stats)
        if errs:
            tun = f"{tun} (and {errs} nomem/txerr in the emulator)"
        tool = rb.md_escape(name if name != "rsync -z" else "rsync -az")
        lines.append(f"| {tool} | {pk['up']:,} / {pk['down']:,} | {dr['up']:,} / {dr['down']:,} "
                     f"| {lo['up']:,} / {lo['down']:,} ({pct}) | {mq:.1f} | {tun} |")
    for name in case.tools:
        s = results.get((case.name, name))
        for c in (s.capped if s else []):
            lines.append(f"\n{rb.md_escape(name)}: {rb.md_escape(c)}.")
    return lines + [""]


def describe(case: Case, ds: rb.Dataset) -> str:
    size = f"{ds.bytes / 1e3:,.0f} KB" if ds.bytes < 1e6 else f"{ds.bytes / 1e6:,.1f} MB"
    if ds.kind == "tree":
        return f"{ds.files:,} {case.what}, {size}"
    return f"{size} of {case.what}" if not case.latency else f"{case.what} of {size}"


def summary(cases: list[Case], datasets: dict, results: dict) -> list[str]:
    cols = ["ferry", "ferry-no-tls", "rsync", "tar|socat", "scp"]
    lines = ["## Summary: medians in seconds (tool time / ferry time)", "",
             "| case | " + " | ".join(rb.md_escape(c) for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for case in cases:
        if "ferry" not in case.tools:
            continue  # reno-lossy: ferry's variants only, in its own table
        ferry_s = results.get((case.name, "ferry"), Series()).median()
        cells = []
        for c in cols:
            name = "rsync -z" if c == "rsync" and "rsync -z" in case.tools else c
            s = results.get((case.name, name))
            if s is None:
                cells.append("–")
            elif s.failures:
                cells.append("FAILED")
            elif not s.seconds:
                cells.append(f"> {s.capped[0].split()[1]} s" if s.capped else "–")
            else:
                med = s.median()
                fmt = f"{med:.3f}" if case.latency else f"{med:.2f}"
                extra = f" ({med / (case.shape.rtt / 1000):.1f} RTT)" if case.latency else ""
                tag = " (-az)" if name == "rsync -z" else ""
                cells.append(f"{fmt}{tag}{extra}" + ("" if c == "ferry" else f" ({fmt_ratio(med, ferry_s)})"))
        lines.append(f"| {case.name}: {describe(case, datasets[case.data])}, {case.shape} | " + " | ".join(cells) + " |")
    return lines + [""]


def report(args, cases, datasets, results, notes, started, elapsed, ferry, origin) -> str:
    lines = ["# ferry over an emulated WAN (bench/wan.py)", "",
             f"- date: {started.strftime('%Y-%m-%d %H:%M %Z')}, {elapsed / 60:.1f} min in all",
             *[f"- machine: {m}" for m in machine()],
             f"- ferry: {rb.ferry_version(ferry, origin)}; defaults (TLS, --compress auto, default streams)",
             f"- peers: {tool_versions()}",
             f"- command: `{shlex.join(['python3', *sys.argv])}`",
             f"- emulator: `{WAN_SH}` (wanem: two namespaces, a TUN each, rate + constant delay + drop-tail "
             "queue + i.i.d. loss in both directions); restarted with the case's shape before every transfer, "
             "the namespaces' TCP metrics cache flushed",
             f"- runs: interleaved (run 1 of every case and tool, then run 2, ...), the first tool rotating "
             f"per run; {', '.join(f'{c.name} {c.runs}' for c in cases)}; scp on the tree: "
             f"{args.scp_tree_runs} run(s), capped at {args.scp_cap:.0f} s",
             "- every run: the destination emptied first (not timed), the time from the client's (sender's) "
             "start until it exits (tar|socat: until the receiving tar exits), then the copy compared with "
             "the source (`cmp` for a file, `diff -r` for the tree)"]
    for name, settings in case_settings.items():
        for s in settings:
            lines.append(f"- emulator, {name}: `{s}`")
    lines += [f"- note: {n}" for n in notes]
    lines.append("")
    lines += summary(cases, datasets, results)
    lines.append("## Cases")
    lines.append("")
    for case in cases:
        lines += case_table(case, datasets[case.data], results)
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(case_names: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"Cases: {', '.join(case_names)}. Tools: ferry, ferry-no-tls, rsync, "
                                       "rsync-z (text only), tar, scp; ferry-reno, ferry-reno-2, "
                                       "ferry-reno-8 (reno-lossy only).")
    p.add_argument("--cases", help="comma list of cases (default: all)")
    p.add_argument("--tools", help="comma list of tools (default: each case's own)")
    p.add_argument("--runs", type=int, help="interleaved runs (default 3, 1 with --quick)")
    p.add_argument("--lossy-runs", type=int, help="runs of the lossy cases (default: --runs)")
    p.add_argument("--latency-runs", type=int, help="runs of the latency case (default 5, 1 with --quick)")
    p.add_argument("--reno-runs", type=int, default=1,
                   help="runs of the Reno case (default 1: it takes about 6 minutes a run)")
    p.add_argument("--scp-tree-runs", type=int, default=1, help="runs of scp on the 3,000 files (default 1)")
    p.add_argument("--scp-cap", type=float, help="seconds scp may take on the tree before it is stopped "
                   "(default 180, 30 with --quick)")
    p.add_argument("--quick", action="store_true", help="small data sets, one run: a smoke test")
    p.add_argument("--ferry", type=Path, help="use this ferry binary instead of building one")
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm/ferry-bench-wan"), help="tmpfs work directory")
    p.add_argument("--keep", action="store_true", help="keep the data sets for the next run")
    p.add_argument("--timeout", type=float, default=rb.DEFAULT_TIMEOUT, help="seconds allowed per command")
    p.add_argument("--out", type=Path, help="report file (default bench/results/wan-DATE.md; "
                   "with --quick, WORKDIR/wan-quick.md)")
    args = p.parse_args()
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.lossy_runs is None:
        args.lossy_runs = args.runs
    if args.latency_runs is None:
        args.latency_runs = 1 if args.quick else 5
    if args.scp_cap is None:
        args.scp_cap = 30.0 if args.quick else 180.0
    if min(args.runs, args.lossy_runs, args.latency_runs, args.reno_runs) < 1:
        p.error("runs must be at least 1")
    return args


def main() -> int:
    cases = make_cases()
    args = parse_args([c.name for c in cases])
    if os.geteuid() != 0:
        raise BenchError("run as root: the emulator creates network namespaces and TUN devices")
    if not WAN_SH.exists():
        raise BenchError(f"no emulator at {WAN_SH} (set WAN_SH)")
    if args.cases:
        want = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in want if c not in {x.name for x in cases}]
        if unknown:
            raise BenchError(f"unknown cases: {', '.join(unknown)} (known: {', '.join(c.name for c in cases)})")
        cases = [c for c in cases if c.name in want]
    tools = make_tools(args.scp_cap)
    if args.tools:
        want = [TOOL_ALIASES.get(t.strip(), t.strip()) for t in args.tools.split(",") if t.strip()]
        unknown = [t for t in want if t not in tools]
        if unknown:
            raise BenchError(f"unknown tools: {', '.join(unknown)} (known: {', '.join(tools)})")
        for c in cases:
            c.tools = [t for t in c.tools if t in want or (t == "rsync -z" and "rsync" in want)]
        cases = [c for c in cases if c.tools]
    for c in cases:
        c.runs = (args.reno_runs if c.reno else args.latency_runs if c.latency
                  else args.lossy_runs if c.shape.loss else args.runs)
    started = datetime.datetime.now().astimezone()
    t_start = time.perf_counter()
    used = {t for c in cases for t in c.tools}
    needs = {"tar", "diff", "cmp", "time", "ip"}
    needs |= {"socat"} if "tar|socat" in used else set()
    needs |= {"rsync"} if used & {"rsync", "rsync -z"} else set()
    needs |= {"sshd", "scp", "ssh-keygen"} if "scp" in used else set()
    rb.install_missing(needs)
    ferry, origin = rb.ferry_binary(args.ferry)

    workdir = args.workdir.resolve()
    data_dir = workdir / ("data-quick" if args.quick else "data")
    logs = workdir / "logs"
    rb.remove(logs)
    for d in (data_dir, logs, workdir / "etc"):
        d.mkdir(parents=True, exist_ok=True)
    specs = dataset_specs(args.quick)
    wanted = sorted({c.data for c in cases})
    rb.check_space(workdir, sum(specs[n][1]["size"] for n in wanted) * 2)

    before = wan_status()
    notes: list[str] = []
    if before:
        notes.append(f"the emulator was already up when the bench started: {before}; "
                     "its shape is restored at the end")
    ctx = rb.Ctx(workdir=workdir, dst_root=workdir / "dst", logs=logs, ferry=ferry,
                 timeout=args.timeout, streams=None)
    prepared = []
    try:
        datasets = {n: ensure(data_dir, n, *specs[n]) for n in wanted}
        for name in sorted(used):
            tools[name].prepare(ctx)
            prepared.append(tools[name])
        load_before = os.getloadavg()
        results = run_all(ctx, cases, datasets, tools, args, notes)
        notes.append("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f} before the runs, "
                     "{:.2f} {:.2f} {:.2f} after".format(*load_before, *os.getloadavg()))
    finally:
        rb.kill_all_live()
        for t in prepared:
            t.cleanup(ctx)
        rb.remove(ctx.dst_root)
        if not args.keep:
            rb.remove(data_dir)
        m = re.search(r"rate ([\d.]+) Mbit/s, rtt ([\d.]+) ms, loss ([\d.]+)%, queue ([\d.]+) ms", before or "")
        if m:
            subprocess.run([str(WAN_SH), "up", *m.groups()], capture_output=True, timeout=60)
        else:
            log(f"the emulator stays up (it was {'up' if before else 'down'} before): `{WAN_SH} down` to remove it")

    text = report(args, cases, datasets, results, notes, started, time.perf_counter() - t_start, ferry, origin)
    rb.write_report(text, args.out or (workdir / "wan-quick.md" if args.quick else
                                       rb.REPO / "bench" / "results" / f"wan-{started.strftime('%Y-%m-%d')}.md"))
    return 0


if __name__ == "__main__":
    rb.run_main(main)
