"""`blkpy bench`: blkpy against its peers on the same files and access patterns, in one run,
row by row against the targets of issue 7.

blkpy's side is the C load generator of the simulated blkfront (simfront.c) going through
the sim hypervisor to a real `blkpy serve` subprocess. Its peers: fio (psync, one job, so
queue depth 1 by nature; io_uring for O_DIRECT and the queue-depth sweep) on the same raw
file, and `qemu-img bench` on the same qcow2 image. Rows (``ROWS``; ``--rows``/``--quick``
pick some):

- 4 KiB random reads at QD1/32/128, 4 KiB random writes at QD32 and 1 MiB sequential reads
  at QD8 on a raw file in the page cache, IOPS against fio psync;
- the backend's CPU per 4 KiB read at QD32 against fio psync's, and its CPU while the guest
  is connected and idle;
- 4 KiB random reads at QD32 with O_DIRECT on the machine's disk (`serve --direct-io`,
  whose engine auto is io_uring, against fio io_uring --direct=1 at the same depth);
- qcow2: 4 KiB random reads, random writes and allocating writes at QD1 and QD32, IOPS
  against `qemu-img bench`;
- NBD: the raw file exported by nbdkit, 4 KiB random reads at QD1/32 and random writes at
  QD32 through `blkpy serve`, against fio's nbd engine (libnbd) on the same export;
- RBD: the same three on an image holding the raw file's bytes, in a one-node Ceph cluster
  started for the run (blkpy/sim/ceph.py), against fio's rbd engine (librbd, with the same
  defaults) on the same image.

Every row also carries p50/p99/p99.9 completion latency: blkpy's as the guest sees it (the
load generator's histogram), fio's from its latency percentiles. With ``repeats`` each side
runs that many times and reports medians; a measurement is "noisy" when other processes
kept more than a quarter of a CPU busy (median over its runs). The page-cache files are
re-read before every run: the kernel's DAMON pages out page-cache pages idle for 60 s on
these machines, which would turn a "page cache" run into a disk run.

    report = run_benchmark(size_mb=256, seconds=5.0)
    print(report.to_text())          # or json.dumps(report.as_dict())
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import mmap
import os
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import click

from blkpy import ring as blkif
from blkpy.bench.qos_row import QosFigures, measure_qos
from blkpy.sim import nbdserver, procinfo, toolstack
from blkpy.sim.ceph import POOL as CEPH_POOL
from blkpy.sim.ceph import CephUnavailable, MicroCeph
from blkpy.sim.frontend import Frontend
from blkpy.sim.guest import SimGuest
from blkpy.sim.host import BackendProcess, SimHost
from blkpy.sim.load_generator import LATENCY_PERCENTILES, percentile_key, run_load

GUEST_DOMID = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
NOISY_FOREIGN_CPU = 0.25  # CPUs' worth of other load that makes a run suspect
# A directory on a real disk in any FHS system (/tmp may be tmpfs): the O_DIRECT row needs
# one, and the page-cache rows do not mind.
DEFAULT_WORKDIR = "/var/tmp"
QCOW2_CLUSTER = 65536  # qemu-img's default, stated so allocating writes can stride by it
FRESH_QCOW2_SIZE = 256 << 30  # virtual size of the fresh image: room for 4M allocations
PRIME_STRIDE_BLOCKS = 104729  # qemu-img bench only strides: a prime stride looks random
WRITE_FILL = 0x5A  # the byte both sides write (zeros could take a special path)
SWEEP_DEPTHS = (1, 2, 4, 8, 16, 32, 64, 128)
_COUNTERS = (
    "map_calls",
    "pages_mapped",
    "unmap_calls",
    "pages_unmapped",
    "copy_calls",
    "copy_segments",
    "notifies",
    "wakeups",
    "submits",
)
_DISKS = {  # pattern.disk -> (devid, vdev, label prefix)
    "raw": (51712, "xvda", ""),
    "direct": (51712, "xvda", "O_DIRECT "),
    "qcow2": (51728, "xvdb", "qcow2 "),
    "qcow2-fresh": (51744, "xvdc", "qcow2 allocating "),
    "nbd": (51760, "xvdd", "NBD "),
    "rbd": (51776, "xvde", "RBD "),
}


@dataclasses.dataclass(frozen=True)
class Pattern:
    """An access pattern on one of the bench's disks."""

    name: str
    block_size: int
    random: bool
    queue_depth: int
    write: bool = False
    # "raw": the raw file in the page cache; "direct": a raw file read with O_DIRECT;
    # "qcow2": a fully allocated qcow2 image; "qcow2-fresh": new regions of an empty one;
    # "nbd": the raw file exported by nbdkit (file plugin) on a unix socket;
    # "rbd": an image of a one-node Ceph cluster holding the raw file's bytes
    disk: str = "raw"
    step: int = 0  # offsets are multiples of this (0: the block size)

    @property
    def label(self) -> str:
        size = (
            f"{self.block_size >> 20}M"
            if self.block_size >= 1 << 20
            else f"{self.block_size >> 10}k"
        )
        kind = f"{'rand' if self.random else 'seq'}{'write' if self.write else 'read'}"
        return f"{_DISKS[self.disk][2]}{kind} {size} QD{self.queue_depth}"

    def at_depth(self, depth: int) -> Pattern:
        return dataclasses.replace(self, queue_depth=depth)


def rand4k(depth: int) -> Pattern:
    return Pattern("rand4k", 4096, True, depth)


@dataclasses.dataclass
class Run:
    """One measured run of one side on one pattern."""

    pattern: str
    side: str  # "blkpy", "fio psync", "fio io_uring", "qemu-img bench"
    queue_depth: int
    iops: float
    mb_per_s: float
    seconds: float
    cpu_seconds: dict[str, float]  # per process role
    foreign_cpu_seconds: float  # busy CPU of everything else on the machine
    wall_seconds: float  # over which foreign CPU was measured (fio: start-up included)
    per_request: dict[str, float] = dataclasses.field(default_factory=dict)
    errors: int = 0
    cached_after: float | None = None  # share of the file still in the page cache
    latency_us: dict[str, float] = dataclasses.field(default_factory=dict)  # p50, p99, p99.9
    note: str = ""

    @property
    def foreign_share(self) -> float:
        """CPUs' worth of other processes' work during the run."""
        return self.foreign_cpu_seconds / max(self.wall_seconds, 1e-9)

    @property
    def noisy(self) -> bool:
        """Other processes kept more than a quarter of a CPU busy during the run."""
        return self.foreign_share > NOISY_FOREIGN_CPU

    @property
    def cpu_us_per_io(self) -> dict[str, float]:
        """CPU microseconds per request of each role: steadier than IOPS on a busy host."""
        ios = self.iops * self.seconds
        return {k: v / ios * 1e6 if ios else 0.0 for k, v in self.cpu_seconds.items()}


@dataclasses.dataclass
class Measurement:
    """The repeated runs of one side on one pattern; its figures are their medians."""

    runs: list[Run]

    @property
    def iops(self) -> float:
        return statistics.median(r.iops for r in self.runs)

    def cpu_us_per_io(self, role: str) -> float | None:
        values = [r.cpu_us_per_io[role] for r in self.runs if role in r.cpu_seconds]
        return statistics.median(values) if values else None

    @property
    def latency_us(self) -> dict[str, float]:
        keys = [percentile_key(p) for p in LATENCY_PERCENTILES]
        return {
            k: statistics.median(r.latency_us[k] for r in self.runs)
            for k in keys
            if all(k in r.latency_us for r in self.runs)
        }

    @property
    def noisy(self) -> bool:
        return statistics.median(r.foreign_share for r in self.runs) > NOISY_FOREIGN_CPU

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)


@dataclasses.dataclass(frozen=True)
class IdleFigures:
    """The served raw disk after its runs: idle CPU, and memory (MiB)."""

    cpu_percent: float
    own_mib: float
    rss_mib: float
    pss_mib: float


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One line of the report: what is compared with what, and the target."""

    key: str  # for --rows
    group: str  # --rows also takes these
    kind: str  # "iops": blkpy/peer IOPS; "cpu": blkpy/peer CPU per I/O; "idle": % of a core;
    # "memory": the serve's own resident MiB
    target: float
    comparison: str  # ">=" or "<="
    pattern: Pattern | None = None
    peer: str | None = None


def _qcow2_rows() -> list[RowSpec]:
    kinds = {
        "read": Pattern("qcow2-read", 4096, True, 1, disk="qcow2"),
        "write": Pattern("qcow2-write", 4096, True, 1, write=True, disk="qcow2"),
        # one write per cluster from a fresh region: every one allocates
        "alloc": Pattern("qcow2-alloc", 4096, False, 1, True, "qcow2-fresh", QCOW2_CLUSTER),
    }
    return [
        RowSpec(f"qcow2-{kind}-qd{depth}", "qcow2", "iops", 1.0, ">=",
                pattern.at_depth(depth), "qemu-img bench")
        for kind, pattern in kinds.items()
        for depth in (1, 32)
    ]


ROWS: tuple[RowSpec, ...] = (
    RowSpec("rand4k-qd1", "rand4k", "iops", 0.4, ">=", rand4k(1), "fio psync"),
    RowSpec("rand4k-qd32", "rand4k", "iops", 0.9, ">=", rand4k(32), "fio psync"),
    RowSpec("rand4k-qd128", "rand4k", "iops", 1.0, ">=", rand4k(128), "fio psync"),
    RowSpec("write4k-qd32", "write4k", "iops", 0.8, ">=",
            Pattern("write4k", 4096, True, 32, write=True), "fio psync"),
    RowSpec("seq1m-qd8", "seq1m", "iops", 0.9, ">=", Pattern("seq1m", 1 << 20, False, 8),
            "fio psync"),
    RowSpec("cpu-qd32", "cpu", "cpu", 1.3, "<=", rand4k(32), "fio psync"),
    RowSpec("idle", "idle", "idle", 1.0, "<="),
    RowSpec("memory", "memory", "memory", 40.0, "<="),
    RowSpec("direct4k-qd32", "direct", "iops", 0.9, ">=",
            Pattern("direct4k", 4096, True, 32, disk="direct"), "fio io_uring"),
    *_qcow2_rows(),
    # NBD: blkpy serving an nbdkit export against fio's nbd engine (libnbd) reading it
    # QoS: a disk limited to QOS_LIMIT_IOPS within 5% of it (value |IOPS/limit - 1|), and
    # its unlimited neighbour on the same host keeping 90% of what it does alone
    RowSpec("qos-limit", "qos", "qos", 0.05, "<="),
    RowSpec("qos-neighbour", "qos", "qos", 0.9, ">="),
    RowSpec("nbd-rand4k-qd1", "nbd", "iops", 0.9, ">=",
            Pattern("nbd-rand4k", 4096, True, 1, disk="nbd"), "fio nbd"),
    RowSpec("nbd-rand4k-qd32", "nbd", "iops", 0.9, ">=",
            Pattern("nbd-rand4k", 4096, True, 32, disk="nbd"), "fio nbd"),
    RowSpec("nbd-write4k-qd32", "nbd", "iops", 0.9, ">=",
            Pattern("nbd-write4k", 4096, True, 32, write=True, disk="nbd"), "fio nbd"),
    # RBD: blkpy serving an image against fio's rbd engine (librbd) on the same image
    *(RowSpec(f"rbd-{kind}-qd{depth}", "rbd", "iops", 0.9, ">=",
              Pattern(f"rbd-{kind}", 4096, True, depth, kind == "write4k", "rbd"), "fio rbd")
      for kind, depth in (("rand4k", 1), ("rand4k", 32), ("write4k", 32))),
)
QUICK_ROWS = ("rand4k-qd32", "cpu-qd32", "write4k-qd32")


def select_rows(names: Iterable[str] | None) -> list[RowSpec]:
    """The rows named (keys or groups, comma-separated strings allowed), in report order;
    all of them for None or nothing."""
    wanted = {n.strip() for name in names or () for n in name.split(",") if n.strip()}
    if not wanted:
        return list(ROWS)
    known = {r.key for r in ROWS} | {r.group for r in ROWS}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(
            f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(r.key for r in ROWS)}; "
            f"groups: {', '.join(dict.fromkeys(r.group for r in ROWS))}"
        )
    return [r for r in ROWS if r.key in wanted or r.group in wanted]


@dataclasses.dataclass
class Row:
    """A row's outcome."""

    key: str
    name: str
    blkpy: float | None  # IOPS, CPU us per I/O or % of a core
    peer: float | None
    peer_side: str | None
    value: float | None  # what meets the target: blkpy/peer, or blkpy's own figure
    target: float
    comparison: str
    pattern: str | None = None  # blkpy's pattern label
    noisy: bool = False
    latency_us: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    errors: int = 0  # blkpy requests answered with an error: the figure does not count
    skipped: str | None = None  # why the row could not be measured

    @property
    def passed(self) -> bool:
        if self.value is None or self.errors:
            return False
        return self.value >= self.target if self.comparison == ">=" else self.value <= self.target

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "pass": self.passed}


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _fmt_latency(lat: dict[str, float]) -> str:
    return "/".join(_fmt(lat.get(percentile_key(p))) for p in LATENCY_PERCENTILES) if lat else "-"


@dataclasses.dataclass
class BenchReport:
    file_size: int
    seconds: float
    cpus: int
    serve_args: list[str]
    runs: list[Run]
    rows: list[Row] = dataclasses.field(default_factory=list)
    repeats: int = 1
    workdir: str = ""

    def measurements(self) -> dict[tuple[str, str], Measurement]:
        """(side, pattern label) -> its runs."""
        out: dict[tuple[str, str], Measurement] = {}
        for run in self.runs:
            out.setdefault((run.side, run.pattern), Measurement([])).runs.append(run)
        return out

    def ratios(self) -> dict[str, dict[str, float]]:
        """blkpy IOPS divided by each peer's, per pattern (medians): every pair measured on
        the same pattern, and each IOPS row's pair (fio psync runs at depth 1 whatever the
        row's depth)."""
        ms = self.measurements()
        out: dict[str, dict[str, float]] = {}
        for (side, pattern), m in ms.items():
            mine = ms.get(("blkpy", pattern))
            if side != "blkpy" and mine and m.iops:
                out.setdefault(pattern, {})[side] = mine.iops / m.iops
        for row in self.rows:
            if row.pattern and row.peer_side and row.value is not None and row.key in _IOPS_ROWS:
                out.setdefault(row.pattern, {})[row.peer_side] = row.value
        return out

    def as_dict(self) -> dict[str, Any]:
        out = {**dataclasses.asdict(self), "ratios": self.ratios()}
        out["rows"] = [row.as_dict() for row in self.rows]
        for run, row in zip(self.runs, out["runs"], strict=True):
            row["cpu_us_per_io"] = run.cpu_us_per_io
            row["noisy"] = run.noisy
        return out

    def to_text(self) -> str:
        lines = [
            f"blkpy bench: {self.file_size >> 20} MiB files"
            + (f" in {self.workdir}" if self.workdir else "")
            + f", {self.seconds:g} s per run, median of {self.repeats}, {self.cpus} CPUs, "
            f"serve {' '.join(self.serve_args) or '(defaults)'}",
            f"{'pattern':<34} {'side':<14} {'QD':>3} {'IOPS':>10} {'MB/s':>8}  "
            "latency us p50/p99/p99.9; CPU seconds",
        ]
        for r in self.runs:
            per_io = r.cpu_us_per_io
            cpu = ", ".join(
                f"{k} {v:.2f} ({per_io[k]:.1f} us/IO)" for k, v in r.cpu_seconds.items()
            )
            lines.append(
                f"{r.pattern:<34} {r.side:<14} {r.queue_depth:>3} {r.iops:>10,.0f} "
                f"{r.mb_per_s:>8,.0f}  {_fmt_latency(r.latency_us)}; {cpu}; "
                f"others {r.foreign_cpu_seconds:.2f}"
                + (f"; {r.errors} ERRORS" if r.errors else "")
                + (" (noisy)" if r.noisy else "")
                + (
                    f" (only {r.cached_after:.0%} of the file stayed cached)"
                    if r.cached_after is not None and r.cached_after < 0.99
                    else ""
                )
                + (f" ({r.note})" if r.note else "")
            )
            if r.per_request:
                per = ", ".join(f"{k} {v:.3f}" for k, v in r.per_request.items())
                lines.append(f"{'':<34} per request: {per}")
        if self.rows:
            lines += [
                "",
                "value: blkpy / peer (idle: blkpy's own); latency us p50/p99/p99.9 blkpy | peer",
                f"{'row':<38} {'blkpy':>10} {'peer':>10} {'':<14} {'value':>6} "
                f"{'target':>7}  {'result':<12} latency",
            ]
        for row in self.rows:
            result = ("SKIPPED" if row.skipped else "ERRORS" if row.errors
                      else "PASS" if row.passed else "SHORT")
            if row.noisy:
                result += " noisy"
            latency = " | ".join(_fmt_latency(row.latency_us.get(s, {}))
                                 for s in ("blkpy", row.peer_side) if s)
            target = f"{row.comparison} {row.target:.2f}"
            line = (
                f"{row.name:<38} {_fmt(row.blkpy):>10} {_fmt(row.peer):>10} "
                f"{row.peer_side or '':<14} {_fmt(row.value):>6} {target:>7}  {result:<12} "
                + (row.skipped or (latency if row.latency_us else ""))
            )
            lines.append(line.rstrip())
        return "\n".join(lines)


_IOPS_ROWS = {r.key for r in ROWS if r.kind == "iops"}


# ---- measuring helpers ---------------------------------------------------------------


def _host_busy_seconds() -> float:
    """CPU time all CPUs spent not idle (from /proc/stat), in seconds."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return (total - idle) / CLK_TCK


def _cpu_clock_id(pid: int) -> int | None:
    """The POSIX CPU-time clock of process ``pid`` (nanosecond resolution, all threads
    including exited ones), or None where libc does not offer one."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        clock = ctypes.c_int()
        return clock.value if libc.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0 else None
    except (OSError, AttributeError):
        return None


def _process_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all threads). The CPU-time clock where possible:
    /proc/<pid>/stat counts in clock ticks, too coarse for an idle backend's cost."""
    clock = _cpu_clock_id(pid)
    if clock is not None:
        with contextlib.suppress(OSError):
            return time.clock_gettime(clock)
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def warm(path: str | Path) -> None:
    """Read the whole file so it is in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass


def cached_fraction(path: str | Path) -> float | None:
    """Share of the file resident in the page cache (util-linux fincore), or None if that
    cannot be told."""
    if shutil.which("fincore") is None:
        return None
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        resident, size = int(out[0]), int(out[1])
    except (subprocess.CalledProcessError, ValueError, IndexError):
        return None
    return resident / size if size else 1.0


def make_file(path: Path, size: int) -> None:
    """A file of ``size`` bytes of random data (not sparse: holes would not be cached)."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)


def drop_from_cache(path: Path) -> None:
    """Write the file back and evict it from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _fs_type(directory: Path) -> str | None:
    """File system type of the mount holding ``directory`` (from /proc/self/mounts)."""
    real = os.path.realpath(directory)
    best, fstype = "", None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, fields[2]
    except OSError:
        return None
    return fstype


def direct_io_problem(directory: str | Path) -> str | None:
    """Why an O_DIRECT file in ``directory`` would not measure a disk (None: it would)."""
    directory = Path(directory)
    fstype = _fs_type(directory)
    if fstype in ("tmpfs", "ramfs"):
        return f"{directory} is on {fstype} (memory, no disk); give --workdir on a disk"
    probe = directory / ".o_direct_probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as exc:
        return f"O_DIRECT refused in {directory}: {exc.strerror}"
    try:
        buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
        os.pwrite(fd, buf, 0)
        os.preadv(fd, [buf], 0)
    except OSError as exc:
        return f"O_DIRECT I/O fails in {directory}: {exc.strerror}"
    finally:
        os.close(fd)
        probe.unlink()
    return None


def _counters(stats: dict[str, Any]) -> dict[str, int]:
    platform = stats.get("platform", {})
    return {k: int(platform.get(k, 0)) for k in _COUNTERS}


def _foreign(busy0: float, *own_cpu: float) -> float:
    """CPU seconds other processes used since ``busy0``, given our processes' CPU."""
    return max(_host_busy_seconds() - busy0 - sum(own_cpu), 0.0)


# ---- blkpy: the simulated guest against `blkpy serve` --------------------------------


class ServedDisk:
    """One disk of the simulated guest, served by its own `blkpy serve` process."""

    def __init__(self, host: SimHost, backend: BackendProcess, frontend: Frontend) -> None:
        self.host = host
        self.backend = backend
        self.frontend = frontend
        self.next_offset = 0  # sequential runs go on where the last one stopped
        self.covered = 0  # bytes the sequential runs have stepped over, all told

    def measure(self, pattern: Pattern, seconds: float, guest_poll_us: int) -> Run:
        pid = self.backend.proc.pid
        xenstored = self.host.xenstored.pid if self.host.xenstored else None
        before = _counters(self.backend.stats())
        wall0 = time.monotonic()
        busy0, be0 = _host_busy_seconds(), _process_cpu_seconds(pid)
        xs0 = _process_cpu_seconds(xenstored) if xenstored else 0.0
        step = pattern.step or pattern.block_size
        result = run_load(
            self.frontend,
            op=blkif.BLKIF_OP_WRITE if pattern.write else blkif.BLKIF_OP_READ,
            nbytes=pattern.block_size,
            depth=pattern.queue_depth,
            seconds=seconds,
            random=pattern.random,
            start=self.next_offset,
            step=step,
            poll_us=guest_poll_us,
            fill_byte=WRITE_FILL,
        )
        be_cpu = _process_cpu_seconds(pid) - be0
        xs_cpu = (_process_cpu_seconds(xenstored) if xenstored else 0.0) - xs0
        foreign = _foreign(busy0, be_cpu, result.cpu_seconds, xs_cpu)
        wall = time.monotonic() - wall0
        after = _counters(self.backend.stats())
        note = ""
        if not pattern.random:
            self.next_offset = result.next_offset
            self.covered += result.completed * step
            size = self.frontend.info.size if self.frontend.info else 0
            if pattern.disk == "qcow2-fresh" and self.covered > size:
                note = "the fresh region ran out: some writes did not allocate"
        n = max(result.completed, 1)
        per_request = {
            f"backend {k}": (after[k] - before[k]) / n
            for k in _COUNTERS
            if not k.startswith("copy") or after[k] - before[k]
        }
        per_request["guest notifies"] = result.notifies / n
        per_request["guest sleeps"] = result.sleeps / n
        return Run(
            pattern=pattern.label,
            side="blkpy",
            queue_depth=pattern.queue_depth,
            iops=result.iops,
            mb_per_s=result.mb_per_s,
            seconds=result.seconds,
            cpu_seconds={"backend": be_cpu, "generator": result.cpu_seconds},
            foreign_cpu_seconds=foreign,
            wall_seconds=wall,
            per_request=per_request,
            errors=result.errors,
            latency_us=result.latency_us(),
            note=note,
        )

    def idle_cpu_percent(self, seconds: float) -> float:
        """The backend's CPU over ``seconds`` of a connected, idle guest, in % of a core."""
        pid = self.backend.proc.pid
        cpu0, t0 = _process_cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        return (_process_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100

    def memory_mib(self) -> tuple[float, float, float]:
        """The serve's own resident memory (anonymous + file pages), its whole RSS and its
        PSS (MiB). The own figure leaves out the guest pages it keeps mapped (persistent
        grants: shared memory in the simulator, foreign frames on Xen): they are the
        guest's memory. PSS counts pages shared with other processes (the interpreter and
        numpy of serves forked by the hotplug daemon) by their share."""
        figures = procinfo.sample(self.backend.proc.pid)
        return (procinfo.mib(figures.own_kib), procinfo.mib(figures.rss_kib),
                procinfo.mib(figures.pss))


@contextlib.contextmanager
def served_disk(
    host: SimHost, guest: SimGuest, disk: str, target: str, ring_order: int
) -> Iterator[ServedDisk]:
    """Add a writable disk the way libxl does, connect the guest's frontend to it, and
    remove it afterwards (its `blkpy serve` exits)."""
    devid, vdev, _prefix = _DISKS[disk]
    spec = toolstack.DiskSpec(GUEST_DOMID, devid, vdev, target)
    backend = host.add_disk(spec)
    assert backend is not None
    xs = host.guest_xenstore(GUEST_DOMID)
    fe = Frontend(guest, xs, devid, max_ring_page_order=ring_order, max_indirect_segments=256)
    try:
        try:
            fe.connect(timeout=15)
        except Exception as exc:
            raise RuntimeError(f"{target}: the guest could not connect: {exc}; "
                               f"backend log: {backend.log()[-1000:]}") from exc
        yield ServedDisk(host, backend, fe)
        fe.close(timeout=10)
    finally:
        host.remove_disk(spec, timeout=10)
        backend.wait(10)
        xs.close()


# ---- the peers -----------------------------------------------------------------------


def fio_run(path: Path | str, size: int, pattern: Pattern, engine: str,
            seconds: float, env: dict[str, str] | None = None) -> Run:
    """fio with one job on ``path`` (for engine nbd: an NBD URI; rbd: POOL/IMAGE of the
    cluster whose conf ``env`` names): ``engine`` psync runs at depth 1 whatever the
    pattern says (a synchronous call per I/O), others at the pattern's depth; O_DIRECT for
    the "direct" disk, the page cache otherwise."""
    depth = 1 if engine == "psync" else pattern.queue_depth
    rw = ("rand" if pattern.random else "") + ("write" if pattern.write else "read")
    cmd = [
        "fio",
        "--name=bench",
        *([] if engine in ("nbd", "rbd") else [f"--filename={path}"]),
        *([] if pattern.write else ["--readonly"]),
        f"--size={size}",
        f"--rw={rw}",
        f"--bs={pattern.block_size}",
        f"--ioengine={engine}",
        *([f"--uri={path}"] if engine == "nbd" else []),  # an engine option: after it
        *(_fio_rbd_options(str(path)) if engine == "rbd" else []),
        f"--iodepth={depth}",
        f"--direct={int(pattern.disk == 'direct')}",
        "--invalidate=0",  # fio would otherwise drop the file from the page cache
        "--norandommap",
        "--randrepeat=0",
        f"--buffer_pattern={WRITE_FILL:#x}",
        f"--percentile_list={':'.join(f'{p:g}' for p in LATENCY_PERCENTILES)}",
        "--lat_percentiles=1",
        f"--runtime={max(int(seconds * 1000), 1)}ms",
        "--time_based",
        "--output-format=json",
    ]
    wall0 = time.monotonic()
    busy0, cpu0 = _host_busy_seconds(), _children_cpu_seconds()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    foreign = _foreign(busy0, _children_cpu_seconds() - cpu0)
    wall = time.monotonic() - wall0
    job = json.loads(out[out.index("{") :])["jobs"][0]
    io = job["write" if pattern.write else "read"]
    runtime = io["runtime"] / 1000 or seconds
    # Total latency (submission + completion), which is what the guest's clock covers: an
    # io_uring read served from the page cache completes inside its submission, leaving
    # next to nothing in clat. For psync the two are the same (fio records no slat).
    lat = io.get("lat_ns", {}).get("percentile") or io.get("clat_ns", {}).get("percentile", {})
    return Run(
        pattern=pattern.at_depth(depth).label,
        side=f"fio {engine}",
        queue_depth=depth,
        iops=float(io["iops"]),
        mb_per_s=io["bw_bytes"] / 1e6,
        seconds=runtime,
        # the job's own CPU over its run time (usr_cpu/sys_cpu are % of it): fio's start-up
        # and parsing would otherwise count as I/O cost, while blkpy's backend is measured
        # from a running process
        cpu_seconds={"fio": (job["usr_cpu"] + job["sys_cpu"]) / 100 * runtime},
        foreign_cpu_seconds=foreign,
        wall_seconds=wall,
        errors=int(job.get("error", 0)),
        latency_us={
            percentile_key(p): lat[f"{p:.6f}"] / 1000
            for p in LATENCY_PERCENTILES
            if f"{p:.6f}" in lat
        },
    )


def _fio_rbd_options(spec: str) -> list[str]:
    pool, image = spec.split("/")
    return ["--clientname=admin", f"--pool={pool}", f"--rbdname={image}"]


def _qemu_img_bench(path: Path, pattern: Pattern, count: int) -> tuple[float, float, float, float]:
    """One `qemu-img bench` run: (its run time, wall time, CPU seconds, foreign CPU)."""
    # -t writeback: through the page cache, as blkpy serves qcow2. Default aio (qemu's
    # thread pool doing preadv/pwritev) rather than -i io_uring: page-cache hits complete
    # inline in io_uring's submission anyway, and the default is what a qemu user gets.
    step = pattern.step or (
        pattern.block_size * PRIME_STRIDE_BLOCKS if pattern.random else pattern.block_size
    )
    cmd = ["qemu-img", "bench", "-f", "qcow2", "-t", "writeback", "-c", str(count),
           "-d", str(pattern.queue_depth), "-s", str(pattern.block_size), "-S", str(step),
           "-o", "0"]
    if pattern.write:
        cmd += ["-w", f"--pattern={WRITE_FILL}"]
    wall0 = time.monotonic()
    busy0, cpu0 = _host_busy_seconds(), _children_cpu_seconds()
    out = subprocess.run([*cmd, str(path)], check=True, capture_output=True, text=True).stdout
    cpu = _children_cpu_seconds() - cpu0
    foreign = _foreign(busy0, cpu)
    wall = time.monotonic() - wall0
    # qemu-img times the requests only, without its start-up and opening the image; the
    # guest's clock starts with an already connected disk too.
    m = re.search(r"Run completed in ([\d.]+) seconds", out)
    return (float(m.group(1)) if m else wall), wall, cpu, foreign


def qemu_img_run(image: Callable[[], Path], pattern: Pattern, seconds: float) -> Run:
    """`qemu-img bench` on the image ``image()`` returns: a short probe on one sizes the
    count so that the measured run, on the next, lasts about ``seconds``."""
    count, limit = 1000, 50_000_000
    path = image()
    if pattern.disk == "qcow2-fresh":
        # every write allocates a whole cluster on the disk: stay within the image and
        # within a quarter of the free space
        step = pattern.step or pattern.block_size
        free = shutil.disk_usage(path.parent).free
        limit = max(min(FRESH_QCOW2_SIZE // step, free // 4 // QCOW2_CLUSTER), count)
    elapsed, *_ = _qemu_img_bench(path, pattern, count)
    count = min(max(int(count * seconds / max(elapsed, 1e-3)), count), limit)
    elapsed, wall, cpu, foreign = _qemu_img_bench(image(), pattern, count)
    elapsed = max(elapsed, 1e-3)
    return Run(
        pattern=pattern.label,
        side="qemu-img bench",
        queue_depth=pattern.queue_depth,
        iops=count / elapsed,
        mb_per_s=count * pattern.block_size / elapsed / 1e6,
        seconds=elapsed,
        cpu_seconds={"qemu-img": cpu},
        foreign_cpu_seconds=foreign,
        wall_seconds=wall,
    )


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def fresh_qcow2(path: Path) -> Path:
    """An empty qcow2 image with room for every allocating write of the bench."""
    path.unlink(missing_ok=True)
    _qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={QCOW2_CLUSTER}",
              str(path), str(FRESH_QCOW2_SIZE))
    return path


# ---- running the rows ----------------------------------------------------------------


@dataclasses.dataclass
class _Side:
    """How to measure one side on one disk."""

    name: str
    measure: Callable[[Pattern], Run]
    cached: Path | None = None  # file to keep in the page cache (re-read before each run)


def _fio_side(engine: str, path: Path | str, size: int, seconds: float,
              cached: bool) -> _Side:
    return _Side(f"fio {engine}", lambda p: fio_run(path, size, p, engine, seconds),
                 Path(path) if cached else None)


def _qemu_side(image: Callable[[], Path], seconds: float, cached: Path | None) -> _Side:
    return _Side("qemu-img bench", lambda p: qemu_img_run(image, p, seconds), cached)


def _peer_pattern(peer: str, pattern: Pattern) -> Pattern:
    return pattern.at_depth(1) if peer == "fio psync" else pattern


def _plan(specs: list[RowSpec], sweep: bool, peers: bool) -> dict[str, list[tuple[str, Pattern]]]:
    """(side, pattern) pairs to measure on each disk, in the order of the rows."""
    todo: dict[str, list[tuple[str, Pattern]]] = {d: [] for d in _DISKS}
    for spec in specs:
        if spec.pattern is not None:
            todo[spec.pattern.disk].append(("blkpy", spec.pattern))
            if peers and spec.peer:
                pair = (spec.peer, _peer_pattern(spec.peer, spec.pattern))
                todo[spec.pattern.disk].append(pair)
    if sweep:
        for depth in SWEEP_DEPTHS:
            todo["raw"].append(("blkpy", rand4k(depth)))
            if peers:
                todo["raw"].append(("fio io_uring", rand4k(depth)))
        if peers:
            todo["raw"].append(("fio psync", rand4k(1)))
    return todo


def _ring_order(patterns: Iterable[Pattern], ring_order: int | None) -> int:
    """The guest's max ring-page-order: the smallest ring holding the deepest queue."""
    if ring_order is not None:
        return ring_order
    depth = max((p.queue_depth for p in patterns), default=1)
    return next(o for o in range(5) if 32 << o >= depth or o == 4)


def _guest_pages(patterns: Iterable[Pattern]) -> int:
    """Guest RAM for the deepest queue of the largest requests, plus slack."""
    need = max((p.queue_depth * (p.block_size // 4096 + 4) for p in patterns), default=0)
    return max(16384, need + 1024)


class _Bench:
    """The measurements of one benchmark run, each taken once whatever rows share it."""

    def __init__(self, todo: dict[str, list[tuple[str, Pattern]]], seconds: float,
                 repeats: int, guest_poll_us: int, ring_order: int | None,
                 say: Callable[[str], None]) -> None:
        self.todo = todo
        self.seconds = seconds
        self.repeats = max(repeats, 1)
        self.guest_poll_us = guest_poll_us
        self.ring_order = ring_order
        self.say = say
        self.results: dict[tuple[str, str], list[Run]] = {}
        self.qos: QosFigures | None = None

    def measure(self, side: _Side, pattern: Pattern) -> None:
        key = (side.name, pattern.label)
        if key in self.results:
            return
        runs = self.results[key] = []
        for i in range(self.repeats):
            if side.cached:
                warm(side.cached)
            self.say(f"{side.name} {pattern.label} ({i + 1}/{self.repeats}) ...")
            run = side.measure(pattern)
            if side.cached:
                run.cached_after = cached_fraction(side.cached)
            runs.append(run)

    def run_disk(self, host: SimHost, guest: SimGuest, disk: str, target: str,
                 peers: list[_Side], cached: Path | None,
                 idle_seconds: float | None = None) -> IdleFigures | None:
        """Serve ``target`` as ``disk`` and measure what the plan has for it; then, given
        ``idle_seconds``, the backend's idle CPU and its memory after the runs."""
        items = self.todo[disk]
        order = _ring_order((p for s, p in items if s == "blkpy"), self.ring_order)
        with served_disk(host, guest, disk, target, order) as served:
            sides = {peer.name: peer for peer in peers}
            sides["blkpy"] = _Side(
                "blkpy", lambda p: served.measure(p, self.seconds, self.guest_poll_us), cached
            )
            for side, pattern in items:
                self.measure(sides[side], pattern)
            if idle_seconds is None:
                return None
            self.say(f"blkpy idle for {idle_seconds:g} s ...")
            cpu = served.idle_cpu_percent(idle_seconds)
            return IdleFigures(cpu, *served.memory_mib())

    def get(self, side: str, pattern: Pattern) -> Measurement | None:
        runs = self.results.get((side, pattern.label))
        return Measurement(runs) if runs else None

    def row(self, spec: RowSpec, idle: IdleFigures | None, idle_seconds: float,
            skipped: dict[str, str]) -> Row:
        """``spec``'s outcome from the medians of what was measured."""
        common = {"key": spec.key, "target": spec.target, "comparison": spec.comparison}
        if spec.kind == "idle":
            cpu = idle.cpu_percent if idle else None
            return Row(name=f"idle backend CPU % of a core ({idle_seconds:g} s)", blkpy=cpu,
                       peer=None, peer_side=None, value=cpu, **common)
        if spec.kind == "qos":
            q = self.qos
            if spec.key == "qos-limit":
                return Row(name="QoS: limited disk IOPS vs its limit (|x/limit - 1|)",
                           blkpy=q.limited if q else None, peer=q.limit if q else None,
                           peer_side="its limit", value=q.deviation if q else None,
                           errors=q.errors if q else 0, **common)
            return Row(name="QoS: unlimited neighbour IOPS, shared vs alone",
                       blkpy=q.neighbour_shared if q else None,
                       peer=q.neighbour_alone if q else None, peer_side="alone",
                       value=q.neighbour_ratio if q else None, errors=q.errors if q else 0,
                       **common)
        if spec.kind == "memory":
            own = idle.own_mib if idle else None
            more = f" (RSS {idle.rss_mib:.1f}, PSS {idle.pss_mib:.1f})" if idle else ""
            return Row(name=f"serve own MiB after the runs{more}", blkpy=own, peer=None,
                       peer_side=None, value=own, **common)
        assert spec.pattern is not None and spec.peer is not None
        pattern = spec.pattern
        mine = self.get("blkpy", pattern)
        theirs = self.get(spec.peer, _peer_pattern(spec.peer, pattern))
        row = Row(name=pattern.label + (" CPU us/IO" if spec.kind == "cpu" else " IOPS"),
                  blkpy=None, peer=None, peer_side=spec.peer, value=None,
                  pattern=pattern.label, skipped=skipped.get(pattern.disk), **common)
        if spec.kind == "cpu":
            row.blkpy = mine.cpu_us_per_io("backend") if mine else None
            row.peer = theirs.cpu_us_per_io("fio") if theirs else None
        else:
            row.blkpy = mine.iops if mine else None
            row.peer = theirs.iops if theirs else None
        if row.blkpy is not None and row.peer:
            row.value = row.blkpy / row.peer
        row.errors = mine.errors if mine else 0
        if row.skipped is None and not theirs:
            row.skipped = "peer not measured"
        row.noisy = any(m.noisy for m in (mine, theirs) if m)
        row.latency_us = {side: m.latency_us for side, m in (("blkpy", mine), (spec.peer, theirs))
                          if m and m.latency_us}
        return row


def _run_rbd(bench: _Bench, serve_args: list[str], raw: Path, size: int, seconds: float,
             skipped: dict[str, str], say: Callable[[str], None]) -> None:
    """The RBD rows: a one-node Ceph cluster for the run, the raw file's bytes imported as
    an image, then blkpy and fio's rbd engine on it in turn."""
    try:
        ceph = MicroCeph()
    except CephUnavailable as exc:
        skipped["rbd"] = str(exc)
        say(f"skipping the RBD rows: {exc}")
        return
    say("starting a one-node Ceph cluster (memstore) and importing the file as an image")
    with ceph:
        spec = f"{CEPH_POOL}/bench"
        ceph.rbd("import", "--no-progress", str(raw), spec, timeout=600)
        with SimHost(serve_args=serve_args) as host:
            pages = _guest_pages(p for _s, p in bench.todo["rbd"])
            guest = host.create_guest(GUEST_DOMID, memory_pages=pages)
            fio = _Side("fio rbd", lambda p: fio_run(spec, size, p, "rbd", seconds, ceph.env()))
            bench.run_disk(host, guest, "rbd", f"rbd:{spec}:conf={ceph.conf}", [fio], None)


def run_benchmark(
    *,
    size_mb: int = 256,
    seconds: float = 5.0,
    rows: Iterable[str] | None = None,
    repeats: int = 1,
    idle_seconds: float = 10.0,
    sweep: bool = False,
    ring_order: int | None = None,
    engine: str | None = None,
    poll_us: int | None = None,
    guest_poll_us: int = 50,
    serve_args: tuple[str, ...] = (),
    peers: bool = True,
    workdir: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure the selected ``rows`` (keys or groups of ``ROWS``; default all) on blkpy
    and, with ``peers``, on fio and qemu-img; returns the report (``echo`` gets progress).

    ``repeats``: runs per side and pattern (medians are reported); ``sweep``: also 4 KiB
    random reads at every depth of ``SWEEP_DEPTHS`` on blkpy and fio io_uring (for
    ``plot_sweep``); ``ring_order``: the guest's max ring-page-order (default: the smallest
    ring holding the deepest queue); ``engine``/``poll_us``: `blkpy serve`
    --engine/--poll-us; ``serve_args``: further serve options (the O_DIRECT row adds
    --direct-io); ``guest_poll_us``: how long the guest polls its ring
    before sleeping on the event channel; ``workdir``: where the test files go (default
    ``DEFAULT_WORKDIR``: the O_DIRECT row needs a disk)."""
    say = echo or (lambda _msg: None)
    specs = select_rows(rows)
    todo = _plan(specs, sweep, peers)
    want_idle = any(s.kind in ("idle", "memory") for s in specs)
    want_qos = any(s.kind == "qos" for s in specs)
    sides = {side for items in todo.values() for side, _p in items}
    if any(s.startswith("fio") for s in sides) and shutil.which("fio") is None:
        raise RuntimeError("fio is not installed (setup.sh installs it)")
    if (todo["qcow2"] or todo["qcow2-fresh"]) and shutil.which("qemu-img") is None:
        raise RuntimeError("qemu-img is not installed (setup.sh installs qemu-utils)")
    if todo["nbd"] and shutil.which("nbdkit") is None:
        raise RuntimeError("nbdkit is not installed (setup.sh installs it)")

    size = size_mb << 20
    args = list(serve_args)
    if engine:
        args += ["--engine", engine]
    if poll_us is not None:
        args += ["--poll-us", str(poll_us)]
    workdir = workdir or DEFAULT_WORKDIR
    tmp = Path(tempfile.mkdtemp(prefix="blkpy-bench-", dir=workdir))
    bench = _Bench(todo, seconds, repeats, guest_poll_us, ring_order, say)
    skipped: dict[str, str] = {}
    idle: IdleFigures | None = None
    try:
        raw = tmp / "bench.raw"
        if todo["raw"] or want_idle or todo["qcow2"] or todo["nbd"] or todo["rbd"]:
            say(f"writing {size_mb} MiB test file {raw}")
            make_file(raw, size)
        if todo["raw"] or want_idle or todo["qcow2"] or todo["qcow2-fresh"]:
            patterns = [p for d in ("raw", "qcow2", "qcow2-fresh") for _s, p in todo[d]]
            with SimHost(serve_args=args) as host:
                guest = host.create_guest(GUEST_DOMID, memory_pages=_guest_pages(patterns))
                if todo["raw"] or want_idle:
                    fio = [_fio_side(e, raw, size, seconds, True) for e in ("psync", "io_uring")]
                    idle = bench.run_disk(host, guest, "raw", str(raw), fio, raw,
                                          idle_seconds if want_idle else None)
                if todo["qcow2"]:
                    image, copy = tmp / "filled.qcow2", tmp / "peer.qcow2"
                    say(f"converting it to qcow2 ({image}) and a copy for qemu-img")
                    _qemu_img("convert", "-O", "qcow2", "-o", f"cluster_size={QCOW2_CLUSTER}",
                              str(raw), str(image))
                    # qemu-img writes its own copy: two writers of one qcow2 image would
                    # each trust their cached metadata
                    shutil.copyfile(image, copy)
                    qemu = _qemu_side(lambda: copy, seconds, copy)
                    bench.run_disk(host, guest, "qcow2", f"qcow2:{image}", [qemu], image)
                if todo["qcow2-fresh"]:
                    image, copy = fresh_qcow2(tmp / "fresh.qcow2"), tmp / "peer-fresh.qcow2"
                    qemu = _qemu_side(lambda: fresh_qcow2(copy), seconds, None)
                    bench.run_disk(host, guest, "qcow2-fresh", f"qcow2:{image}", [qemu], None)
        if todo["nbd"]:
            with nbdserver.nbdkit(tmp, "file", str(raw)) as server, \
                    SimHost(serve_args=args) as host:
                pages = _guest_pages(p for _s, p in todo["nbd"])
                guest = host.create_guest(GUEST_DOMID, memory_pages=pages)
                fio = [_fio_side("nbd", server.uri, size, seconds, False)]
                bench.run_disk(host, guest, "nbd", server.target, fio, raw)
        if todo["rbd"]:
            _run_rbd(bench, args, raw, size, seconds, skipped, say)
        if want_qos:
            files = (tmp / "qos-a.raw", tmp / "qos-b.raw")
            for f in files:
                make_file(f, size)
                warm(f)
            bench.qos = measure_qos(files, seconds, args, guest_poll_us, say)
        if todo["direct"]:
            problem = direct_io_problem(tmp)
            if problem:
                skipped["direct"] = problem
                say(f"skipping the O_DIRECT rows: {problem}")
            else:
                direct = tmp / "direct.raw"
                say(f"writing {size_mb} MiB O_DIRECT test file {direct}")
                make_file(direct, size)
                drop_from_cache(direct)
                with SimHost(serve_args=[*args, "--direct-io"]) as host:
                    pages = _guest_pages(p for _s, p in todo["direct"])
                    guest = host.create_guest(GUEST_DOMID, memory_pages=pages)
                    fio = [_fio_side("io_uring", direct, size, seconds, False)]
                    bench.run_disk(host, guest, "direct", str(direct), fio, None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    runs = [run for rs in bench.results.values() for run in rs]
    report = BenchReport(size, seconds, os.cpu_count() or 1, args, runs,
                         repeats=bench.repeats, workdir=str(workdir))
    report.rows = [bench.row(s, idle, idle_seconds, skipped) for s in specs]
    return report


# ---- the queue-depth plot ------------------------------------------------------------


class PlotUnavailable(click.ClickException):
    """matplotlib is missing (an optional extra)."""


def _pyplot() -> Any:
    """matplotlib's pyplot drawing to files only; imported on demand (optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(
            "--plot needs matplotlib: install blkpy with its `plot` extra"
        ) from exc
    return plt


def plot_sweep(report: BenchReport, path: str | Path) -> None:
    """IOPS and p99 latency against queue depth (the sweep's 4 KiB random reads) for blkpy
    and fio io_uring, with fio psync (depth 1 by nature) as a horizontal reference."""
    plt = _pyplot()
    ms = report.measurements()
    fig, (ax_iops, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for side, style in (("blkpy", "o-"), ("fio io_uring", "s--")):
        points = [(d, m) for d in SWEEP_DEPTHS if (m := ms.get((side, rand4k(d).label)))]
        if not points:
            continue
        ax_iops.plot([d for d, _m in points], [m.iops for _d, m in points], style, label=side)
        p99 = [(d, m.latency_us["p99"]) for d, m in points if "p99" in m.latency_us]
        ax_lat.plot([d for d, _v in p99], [v for _d, v in p99], style, label=side)
    psync = ms.get(("fio psync", rand4k(1).label))
    if psync:
        ref = {"color": "gray", "linestyle": ":", "label": "fio psync (QD1)"}
        ax_iops.axhline(psync.iops, **ref)
        if "p99" in psync.latency_us:
            ax_lat.axhline(psync.latency_us["p99"], **ref)
    from matplotlib.ticker import EngFormatter, LogFormatterSciNotation

    eng = EngFormatter(sep="")

    class EngLog(LogFormatterSciNotation):
        """Labels where matplotlib's log axis would put one, written as 20k, not 2x10^4."""

        def __call__(self, x: float, pos: int | None = None) -> str:
            return eng.format_eng(x) if super().__call__(x, pos) else ""

    for ax, ylabel in ((ax_iops, "IOPS"), (ax_lat, "p99 completion latency (us)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(SWEEP_DEPTHS, [str(d) for d in SWEEP_DEPTHS])
        low, high = ax.get_ylim()
        if ax is ax_lat or high > 20 * max(low, 1e-9):
            ax.set_yscale("log")  # latency spans decades across depths, IOPS may too
            ax.yaxis.set_major_formatter(EngLog())
            ax.yaxis.set_minor_formatter(EngLog(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        else:
            ax.set_ylim(bottom=0)
            ax.yaxis.set_major_formatter(eng)
        ax.set_xlabel("queue depth")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax_iops.set_title("IOPS")
    ax_lat.set_title("p99 latency")
    fig.suptitle(f"4 KiB random reads, {report.file_size >> 20} MiB file in the page cache, "
                 f"{report.seconds:g} s per point, median of {report.repeats}")
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- command line (`blkpy bench`, bench/run_bench.py) --------------------------------


def _rows_help() -> str:
    groups: dict[str, list[str]] = {}
    for r in ROWS:
        groups.setdefault(r.group, []).append(r.key)
    lines = [
        textwrap.fill(" ".join(keys), 76, initial_indent=f"  {group:<8} ",
                      subsequent_indent=" " * 11, break_on_hyphens=False)
        for group, keys in groups.items()
    ]
    return "\b\nRows (--rows takes a group or single rows):\n" + "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=_rows_help())
@click.option("--size-mb", default=256, show_default=True, help="Size of each test file.")
@click.option("--seconds", default=5.0, show_default=True, help="Duration of each run.")
@click.option("--repeats", type=click.IntRange(1), default=1, show_default=True,
              help="Runs per side and pattern; rows report the medians.")
@click.option("--rows", "rows", multiple=True, metavar="ROW[,ROW...]",
              help="Rows to run, by name or group (below; repeatable; default: all).")
@click.option("--quick", is_flag=True,
              help=f"Add the CI-sized subset {','.join(QUICK_ROWS)} (alone: only it).")
@click.option("--idle-seconds", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="How long the idle row watches the backend.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Also sweep queue depths 1-128 (4 KiB random reads; blkpy, fio io_uring) "
              "and draw IOPS and p99 latency against depth into this PNG (needs the `plot` "
              "extra, matplotlib).")
@click.option("--workdir", type=click.Path(file_okay=False, exists=True),
              default=DEFAULT_WORKDIR, show_default=True,
              help="Where the test files go; on a disk (not tmpfs) for the O_DIRECT row.")
@click.option("--ring-order", type=click.IntRange(0, 4), default=None,
              help="Guest max ring-page-order (default: smallest ring holding the QD).")
@click.option("--engine", default=None, help="`blkpy serve --engine` (default: serve's).")
@click.option("--poll-us", type=int, default=None, help="`blkpy serve --poll-us`.")
@click.option("--guest-poll-us", default=50, show_default=True,
              help="How long the guest polls its ring before sleeping.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench_command(
    as_json: bool, rows: tuple[str, ...], quick: bool, plot: str | None, **options: Any
) -> None:
    """Measure blkpy against fio and qemu-img on the same files and patterns, row by row
    against its targets."""
    if plot:
        _pyplot()  # a missing extra fails now, not after minutes of measuring
    selected = (*rows, *(QUICK_ROWS if quick else ()))
    try:
        select_rows(selected)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--rows") from exc
    try:
        report = run_benchmark(rows=selected, sweep=plot is not None,
                               echo=lambda msg: click.echo(msg, err=True), **options)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        raise click.ClickException(str(exc)) from exc
    if plot:
        plot_sweep(report, plot)
        click.echo(f"plot written to {plot}", err=True)
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.to_text())
