"""qcow2 engine vs ``qemu-img bench`` on the same image and access pattern, in one run.

Patterns: 4 KiB "random" (a large prime stride modulo the image size, because qemu-img
bench only strides) read and write, 64 KiB sequential read and write; queue depths 1 and
32. qemu-img runs with the page cache (-t writeback) like blkpy. blkpy's Disk is
synchronous: at depth 32 it is handed batches of 32 requests, as the dispatcher does.
Neither side's time includes the final flush (qemu-img bench stops its clock before
closing the image). Each figure is the median of --repeat runs, each on a fresh copy.

    python3 bench/qcow2_bench.py [--size-mib 128] [--count 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from blkpy.backends.qcow2 import Qcow2Disk

PRIME_STRIDE_BLOCKS = 104729  # coprime with any power-of-two image size


def qemu_bench(path: str, count: int, depth: int, bsize: int, step: int, write: bool) -> float:
    args = ["qemu-img", "bench", "-f", "qcow2", "-t", "writeback", "-c", str(count),
            "-d", str(depth), "-s", str(bsize), "-S", str(step)]
    if write:
        args += ["-w", "--pattern=0x5a"]
    out = subprocess.run([*args, path], capture_output=True, text=True, check=True).stdout
    secs = float(re.search(r"Run completed in ([\d.]+) seconds", out).group(1))
    return count / secs


def blkpy_bench(path: str, count: int, depth: int, bsize: int, step: int, write: bool,
                size: int) -> float:
    buf = memoryview(bytearray(b"\x5a" * bsize))
    offsets = [(i * step) % size for i in range(count)]
    with Qcow2Disk(path) as disk:
        op = disk.writev if write else disk.readv
        start = time.perf_counter()
        for b in range(0, count, depth):
            for off in offsets[b:b + depth]:  # one batch, as the dispatcher hands it over
                op(off, [buf])
        secs = time.perf_counter() - start
    return count / secs


def prepare(workdir: str, size: int, allocated: bool) -> str:
    path = os.path.join(workdir, "allocated.qcow2" if allocated else "empty.qcow2")
    if allocated:
        raw = os.path.join(workdir, "fill.raw")
        with open(raw, "wb") as f:
            chunk = bytes(range(256)) * 4096
            for _ in range(size // len(chunk)):
                f.write(chunk)
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, path], check=True)
        os.unlink(raw)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)
    return path


def warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 22):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if shutil.which("qemu-img") is None:
        sys.exit("qemu-img not found (setup.sh installs qemu-utils)")
    size = args.size_mib << 20
    workdir = tempfile.mkdtemp(prefix="qcow2bench-")
    try:
        allocated = prepare(workdir, size, allocated=True)
        cases = [
            ("4k-rand-read", 4096, 4096 * PRIME_STRIDE_BLOCKS, False, args.count),
            ("4k-rand-write", 4096, 4096 * PRIME_STRIDE_BLOCKS, True, args.count),
            ("64k-seq-read", 65536, 65536, False, min(args.count, size // 65536)),
            ("64k-seq-write", 65536, 65536, True, min(args.count, size // 65536)),
            ("4k-rand-write-alloc", 4096, 4096 * PRIME_STRIDE_BLOCKS, True, args.count),
        ]
        print(f"{'pattern':<22}{'QD':>4}{'qemu-img IOPS':>15}{'blkpy IOPS':>13}{'ratio':>8}")
        for name, bsize, step, write, count in cases:
            for depth in (1, 32):
                runs: dict[str, list[float]] = {"qemu": [], "blkpy": []}
                for _ in range(args.repeat):
                    for runner in ("qemu", "blkpy"):  # interleaved: both see the same noise
                        path = os.path.join(workdir, "run.qcow2")
                        if name.endswith("alloc"):
                            path = prepare(workdir, size, allocated=False)
                        else:  # every run starts from the same image state
                            shutil.copyfile(allocated, path)
                        warm(path)
                        if runner == "qemu":
                            iops = qemu_bench(path, count, depth, bsize, step, write)
                        else:
                            iops = blkpy_bench(path, count, depth, bsize, step, write, size)
                        runs[runner].append(iops)
                q, b = statistics.median(runs["qemu"]), statistics.median(runs["blkpy"])
                print(f"{name:<22}{depth:>4}{q:>15,.0f}{b:>13,.0f}{b / q:>8.2f}", flush=True)
    finally:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
