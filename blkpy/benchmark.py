"""The first benchmark: the simulated guest against `blkpy serve`, and fio, on one raw file
in the page cache, with the same access patterns, in the same run.

Patterns: 4 KiB random reads at queue depth ``queue_depth`` and 1 MiB sequential reads at
``seq_queue_depth``. For each: blkpy (the C load generator of the simulated blkfront,
through the sim hypervisor, to a `blkpy serve` subprocess), fio psync (one job, queue
depth 1 by nature) and fio io_uring (same queue depth as blkpy). Reported per run: IOPS,
MB/s, CPU seconds of each side (backend from /proc/<pid>/stat, generator and fio from
getrusage), CPU used by other processes meanwhile (noisy runs show up there), and for
blkpy the sim counters per request (grant maps, pages mapped, unmaps, notifications).

The file is re-read before every run: the kernel's DAMON pages out page-cache pages idle
for 60 s on these machines, which would turn a "page cache" run into a disk run.

    report = run_benchmark(size_mb=256, seconds=5.0)
    print(report.to_text())          # or json.dumps(report.as_dict())
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from blkpy.sim import toolstack
from blkpy.sim.frontend import Frontend
from blkpy.sim.host import SimHost
from blkpy.sim.load_generator import run_reads

GUEST_DOMID = 1
DEVID = 51712  # xvda
CLK_TCK = os.sysconf("SC_CLK_TCK")
NOISY_FOREIGN_CPU = 0.25  # CPUs' worth of other load that makes a run suspect
_COUNTERS = (
    "map_calls",
    "pages_mapped",
    "unmap_calls",
    "pages_unmapped",
    "copy_calls",
    "copy_segments",
    "notifies",
    "wakeups",
)


@dataclasses.dataclass(frozen=True)
class Pattern:
    name: str
    block_size: int
    random: bool
    queue_depth: int

    @property
    def label(self) -> str:
        size = (
            f"{self.block_size >> 20}M"
            if self.block_size >= 1 << 20
            else f"{self.block_size >> 10}k"
        )
        return f"{'randread' if self.random else 'seqread'} {size} QD{self.queue_depth}"


@dataclasses.dataclass
class Run:
    """One measured run of one side on one pattern."""

    pattern: str
    side: str  # "blkpy", "fio psync", "fio io_uring"
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

    @property
    def noisy(self) -> bool:
        """Other processes kept more than a quarter of a CPU busy during the run."""
        return self.foreign_cpu_seconds > NOISY_FOREIGN_CPU * self.wall_seconds

    @property
    def cpu_us_per_io(self) -> dict[str, float]:
        """CPU microseconds per request of each role: steadier than IOPS on a busy host."""
        ios = self.iops * self.seconds
        return {k: v / ios * 1e6 if ios else 0.0 for k, v in self.cpu_seconds.items()}


@dataclasses.dataclass
class BenchReport:
    file_size: int
    seconds: float
    cpus: int
    serve_args: list[str]
    runs: list[Run]

    def ratios(self) -> dict[str, dict[str, float]]:
        """blkpy IOPS divided by each fio side's, per pattern."""
        out: dict[str, dict[str, float]] = {}
        for run in self.runs:
            if run.side == "blkpy":
                continue
            mine = next(
                (r for r in self.runs if r.side == "blkpy" and r.pattern == run.pattern), None
            )
            if mine and run.iops:
                out.setdefault(run.pattern, {})[run.side] = mine.iops / run.iops
        return out

    def as_dict(self) -> dict[str, Any]:
        out = {**dataclasses.asdict(self), "ratios": self.ratios()}
        for run, row in zip(self.runs, out["runs"], strict=True):
            row["cpu_us_per_io"] = run.cpu_us_per_io
            row["noisy"] = run.noisy
        return out

    def to_text(self) -> str:
        lines = [
            f"blkpy bench: {self.file_size >> 20} MiB raw file in the page cache, "
            f"{self.seconds:g} s per run, {self.cpus} CPUs, serve {' '.join(self.serve_args) or '(defaults)'}",
            f"{'pattern':<20} {'side':<14} {'QD':>3} {'IOPS':>10} {'MB/s':>8}  CPU seconds",
        ]
        for r in self.runs:
            per_io = r.cpu_us_per_io
            cpu = ", ".join(
                f"{k} {v:.2f} ({per_io[k]:.1f} us/IO)" for k, v in r.cpu_seconds.items()
            )
            lines.append(
                f"{r.pattern:<20} {r.side:<14} {r.queue_depth:>3} {r.iops:>10,.0f} "
                f"{r.mb_per_s:>8,.0f}  {cpu}; others {r.foreign_cpu_seconds:.2f}"
                + (f"; {r.errors} ERRORS" if r.errors else "")
                + (" (noisy)" if r.noisy else "")
                + (
                    f" (only {r.cached_after:.0%} of the file stayed cached)"
                    if r.cached_after is not None and r.cached_after < 0.99
                    else ""
                )
            )
            if r.per_request:
                per = ", ".join(f"{k} {v:.3f}" for k, v in r.per_request.items())
                lines.append(f"{'':<20} per request: {per}")
        for pattern, sides in self.ratios().items():
            ratio = ", ".join(f"{side} {v:.2f}" for side, v in sides.items())
            lines.append(f"ratio blkpy : fio, {pattern}: {ratio}")
        return "\n".join(lines)


# ---- measuring helpers ---------------------------------------------------------------


def _host_busy_seconds() -> float:
    """CPU time all CPUs spent not idle (from /proc/stat), in seconds."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return (total - idle) / CLK_TCK


def _process_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all threads)."""
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


def _counters(stats: dict[str, Any]) -> dict[str, int]:
    platform = stats.get("platform", {})
    return {k: int(platform.get(k, 0)) for k in _COUNTERS}


# ---- the two sides -------------------------------------------------------------------


def _blkpy_run(
    host: SimHost, backend: Any, fe: Frontend, pattern: Pattern, seconds: float, guest_poll_us: int
) -> Run:
    pid = backend.proc.pid
    before = _counters(backend.stats())
    wall0 = time.monotonic()
    busy0, be0 = _host_busy_seconds(), _process_cpu_seconds(pid)
    xs0 = _process_cpu_seconds(host.xenstored.pid) if host.xenstored else 0.0
    result = run_reads(
        fe,
        nbytes=pattern.block_size,
        depth=pattern.queue_depth,
        seconds=seconds,
        random=pattern.random,
        poll_us=guest_poll_us,
    )
    be_cpu = _process_cpu_seconds(pid) - be0
    xs_cpu = (_process_cpu_seconds(host.xenstored.pid) if host.xenstored else 0.0) - xs0
    busy = _host_busy_seconds() - busy0
    wall = time.monotonic() - wall0
    after = _counters(backend.stats())
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
        foreign_cpu_seconds=max(busy - be_cpu - result.cpu_seconds - xs_cpu, 0.0),
        wall_seconds=wall,
        per_request=per_request,
        errors=result.errors,
    )


def _fio_run(path: Path, size: int, pattern: Pattern, engine: str, seconds: float) -> Run:
    depth = 1 if engine == "psync" else pattern.queue_depth
    cmd = [
        "fio",
        "--name=bench",
        f"--filename={path}",
        "--readonly",
        f"--size={size}",
        f"--rw={'randread' if pattern.random else 'read'}",
        f"--bs={pattern.block_size}",
        f"--ioengine={engine}",
        f"--iodepth={depth}",
        "--direct=0",
        "--invalidate=0",  # fio would otherwise drop the file from the page cache
        "--norandommap",
        "--randrepeat=0",
        f"--runtime={max(int(seconds * 1000), 1)}ms",
        "--time_based",
        "--output-format=json",
    ]
    wall0 = time.monotonic()
    busy0, cpu0 = _host_busy_seconds(), _children_cpu_seconds()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    cpu = _children_cpu_seconds() - cpu0
    busy = _host_busy_seconds() - busy0
    wall = time.monotonic() - wall0
    job = json.loads(out[out.index("{") :])["jobs"][0]
    read = job["read"]
    runtime = read["runtime"] / 1000 or seconds
    return Run(
        pattern=pattern.label,
        side=f"fio {engine}",
        queue_depth=depth,
        iops=float(read["iops"]),
        mb_per_s=read["bw_bytes"] / 1e6,
        seconds=runtime,
        cpu_seconds={"fio": cpu},
        foreign_cpu_seconds=max(busy - cpu, 0.0),
        wall_seconds=wall,
        errors=int(job.get("error", 0)),
    )


def _quietest(
    label: str, image: Path, repeats: int, say: Callable[[str], None], measure: Callable[[], Run]
) -> Run:
    """Measure ``repeats`` times on a freshly warmed file; keep the least disturbed run."""
    tries = []
    for _ in range(max(repeats, 1)):
        warm(image)
        say(f"{label} ...")
        run = measure()
        run.cached_after = cached_fraction(image)
        tries.append(run)
    return min(tries, key=lambda r: r.foreign_cpu_seconds / max(r.wall_seconds, 1e-9))


def run_benchmark(
    *,
    size_mb: int = 256,
    seconds: float = 5.0,
    queue_depth: int = 32,
    seq_queue_depth: int = 8,
    ring_order: int | None = None,
    engine: str | None = None,
    poll_us: int | None = None,
    guest_poll_us: int = 50,
    serve_args: tuple[str, ...] = (),
    fio_engines: tuple[str, ...] = ("psync", "io_uring"),
    repeats: int = 1,
    workdir: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> BenchReport:
    """Run every pattern on blkpy and on fio; returns the report (``echo`` gets progress).

    ``ring_order``: the guest's max ring-page-order (default: the smallest ring holding
    ``queue_depth`` requests); ``engine``/``poll_us``: passed to `blkpy serve` as
    --engine/--poll-us; ``serve_args``: any further serve options; ``guest_poll_us``: how
    long the guest polls its ring before sleeping on the event channel; ``repeats``: runs
    per side and pattern, keeping the one least disturbed by other processes."""
    say = echo or (lambda _msg: None)
    if shutil.which("fio") is None and fio_engines:
        raise RuntimeError("fio is not installed (setup.sh installs it)")
    patterns = [
        Pattern("rand4k", 4096, True, queue_depth),
        Pattern("seq1m", 1 << 20, False, seq_queue_depth),
    ]
    size = size_mb << 20
    args = list(serve_args)
    if engine:
        args += ["--engine", engine]
    if poll_us is not None:
        args += ["--poll-us", str(poll_us)]
    if ring_order is None:
        depth = max(queue_depth, seq_queue_depth)
        ring_order = next(o for o in range(5) if 32 << o >= depth or o == 4)
    tmp = tempfile.mkdtemp(prefix="blkpy-bench-", dir=workdir)
    image = Path(tmp) / "bench.raw"
    runs: list[Run] = []
    try:
        say(f"writing {size_mb} MiB test file {image}")
        make_file(image, size)
        with SimHost(serve_args=args) as host:
            # guest RAM: the deepest queue of 1 MiB requests plus slack
            pages = max(16384, seq_queue_depth * 260 + queue_depth * 2 + 1024)
            guest = host.create_guest(GUEST_DOMID, memory_pages=pages)
            spec = toolstack.DiskSpec(GUEST_DOMID, DEVID, "xvda", str(image), readonly=True)
            backend = host.add_disk(spec)
            fe = Frontend(
                guest,
                host.guest_xenstore(GUEST_DOMID),
                DEVID,
                max_ring_page_order=ring_order,
                max_indirect_segments=256,
            )
            fe.connect(timeout=15)

            for p in patterns:
                runs.append(
                    _quietest(
                        f"blkpy {p.label}",
                        image,
                        repeats,
                        say,
                        lambda p=p: _blkpy_run(host, backend, fe, p, seconds, guest_poll_us),
                    )
                )
                for fio_engine in fio_engines:
                    runs.append(
                        _quietest(
                            f"fio {fio_engine} {p.label}",
                            image,
                            repeats,
                            say,
                            lambda p=p, e=fio_engine: _fio_run(image, size, p, e, seconds),
                        )
                    )
            fe.close(timeout=10)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BenchReport(size, seconds, os.cpu_count() or 1, args, runs)


# ---- command line (`blkpy bench`, bench/run_bench.py) --------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--size-mb", default=256, show_default=True, help="Size of the test file.")
@click.option("--seconds", default=5.0, show_default=True, help="Duration of each run.")
@click.option("--queue-depth", default=32, show_default=True, help="QD of 4 KiB random reads.")
@click.option("--seq-queue-depth", default=8, show_default=True, help="QD of 1 MiB reads.")
@click.option("--ring-order", type=click.IntRange(0, 4), default=None,
              help="Guest max ring-page-order (default: smallest ring holding the QD).")
@click.option("--engine", default=None, help="`blkpy serve --engine` (default: serve's).")
@click.option("--poll-us", type=int, default=None, help="`blkpy serve --poll-us`.")
@click.option("--guest-poll-us", default=50, show_default=True,
              help="How long the guest polls its ring before sleeping.")
@click.option("--fio-engine", "fio_engines", multiple=True, default=("psync", "io_uring"),
              show_default=True, help="fio ioengines to compare with (repeatable).")
@click.option("--repeats", default=1, show_default=True,
              help="Runs per measurement; the one least disturbed by other load is kept.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench_command(as_json: bool, **options: object) -> None:
    """Measure blkpy against fio on the same file and patterns."""
    report = run_benchmark(echo=lambda msg: click.echo(msg, err=True), **options)
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.to_text())
