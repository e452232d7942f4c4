#!/usr/bin/env python3
"""Run blkpy's benchmark (the simulated guest against `blkpy serve`, and fio and qemu-img
bench on the same files) and print every row against its target. Same as `blkpy bench`."""

from blkpy.bench.benchmark import bench_command

if __name__ == "__main__":
    bench_command()
