#!/usr/bin/env python3
"""The backend's own CPU cost per request by batch size, with no process boundary: the
guest and the dispatcher share one process (blkpy.sim.inprocess), so the figures are the
ring parse, validation, grant handling, the batched preadv in C and the responses. DESIGN's
prototype found the fixed per-batch numpy work dominant at small batches; this shows where
the crossover lies. Reference: fio psync on the same file in the same run."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time

import click
import numpy as np

from blkpy import ring
from blkpy.sim.inprocess import InProcessDevice

SIZE = 64 << 20


def _measure(dev: InProcessDevice, pages: list[tuple[int, int]], batch: int,
             seconds: float) -> tuple[float, float]:
    rng = np.random.default_rng(batch)
    reqs = np.zeros(batch, dtype=dev.abi.request)
    reqs["operation"] = ring.BLKIF_OP_READ
    reqs["id"] = np.arange(batch)
    reqs["nr_segments"] = 1
    reqs["seg"]["gref"][:, 0] = [pages[i % len(pages)][1] for i in range(batch)]
    reqs["seg"]["last_sect"][:, 0] = 7
    done, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        reqs["sector_number"] = rng.integers(0, SIZE // 4096, batch) * 8
        dev.front.put_requests(reqs)
        dev.front.push_requests()
        dev.vbd.kick()
        done += len(dev.front.consume_responses())
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return done / wall, cpu / done * 1e6


def _fio(path: str, seconds: float) -> tuple[float, float]:
    out = subprocess.run(
        ["fio", "--name=ref", f"--filename={path}", "--readonly", "--rw=randread", "--bs=4k",
         "--ioengine=psync", "--invalidate=0", f"--runtime={int(seconds * 1000)}ms",
         "--time_based", "--output-format=json"], check=True, capture_output=True, text=True,
    ).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    iops = job["read"]["iops"]
    cpu_s = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["read"]["runtime"] / 1000
    return iops, cpu_s / max(iops * job["read"]["runtime"] / 1000, 1) * 1e6


@click.command()
@click.option("--seconds", default=1.0, show_default=True, help="Per batch size.")
@click.option("--grant-mode", type=click.Choice(["map", "copy"]), default="map",
              show_default=True)
@click.option("--persistent/--no-persistent", default=True, show_default=True)
def main(seconds: float, grant_mode: str, persistent: bool) -> None:
    """4 KiB random reads from the page cache, batch sizes 1-256."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "disk.raw")
        with open(path, "wb") as f:
            f.write(os.urandom(SIZE))
        dev = InProcessDevice(path, order=4, persistent=persistent, grant_mode=grant_mode)
        try:
            pages = [dev.data_page(0) for _ in range(256)]
            click.echo(f"{'batch':>5} {'req/s':>10} {'us CPU/req':>10}  (guest + backend)")
            for batch in (1, 4, 16, 32, 64):
                rate, us = _measure(dev, pages, batch, seconds)
                click.echo(f"{batch:>5} {rate:>10,.0f} {us:>10.2f}")
        finally:
            dev.close()
        iops, us = _fio(path, seconds)
        click.echo(f"fio psync {iops:>10,.0f} {us:>10.2f}")


if __name__ == "__main__":
    main()
