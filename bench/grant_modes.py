#!/usr/bin/env python3
"""How the guest's pages reach the backend, measured: persistent mapping, a batched map and
unmap per batch, or grant copy, each against the same file and patterns in one run. The
figures decide `blkpy serve --grant-mode auto` (README, design notes). On the sim platform
a map costs an mmap per page and a copy a memcpy; on Xen both are hypercalls and each unmap
also flushes TLBs, so read the map/unmap counts per request next to the IOPS."""

from __future__ import annotations

import click

from blkpy.bench.benchmark import run_benchmark

MODES = {
    "persistent map": ("--grant-mode", "map", "--persistent"),
    "transient map": ("--grant-mode", "map", "--no-persistent"),
    "grant copy": ("--grant-mode", "copy", "--no-persistent"),
}


@click.command()
@click.option("--size-mb", default=128, show_default=True)
@click.option("--seconds", default=3.0, show_default=True)
def main(size_mb: int, seconds: float) -> None:
    """Compare the grant modes of `blkpy serve` (fio psync on the same file as reference)."""
    rows = []
    for label, args in MODES.items():
        click.echo(f"{label} ...", err=True)
        report = run_benchmark(size_mb=size_mb, seconds=seconds, serve_args=args,
                               rows=("rand4k-qd32", "seq1m"), peers=not rows)
        for run in report.runs:
            side = label if run.side == "blkpy" else run.side
            backend_cpu = run.cpu_seconds.get("backend", run.cpu_seconds.get("fio", 0.0))
            per = run.per_request
            rows.append((run.pattern, side, run.iops, run.mb_per_s,
                         backend_cpu / max(run.iops * run.seconds, 1) * 1e6,
                         per.get("backend map_calls", 0.0), per.get("backend copy_calls", 0.0),
                         run.noisy))
    click.echo(f"{'pattern':<20} {'side':<16} {'IOPS':>9} {'MB/s':>7} {'us CPU/req':>10} "
               f"{'maps/req':>9} {'copies/req':>10}")
    for pattern, side, iops, mbs, us, maps, copies, noisy in sorted(rows):
        flag = "  (noisy: other load on the machine)" if noisy else ""
        click.echo(f"{pattern:<20} {side:<16} {iops:>9,.0f} {mbs:>7,.0f} {us:>10.1f} "
                   f"{maps:>9.3f} {copies:>10.3f}{flag}")


if __name__ == "__main__":
    main()
