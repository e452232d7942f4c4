#!/usr/bin/env python3
"""Run blkpy's first benchmark (the simulated guest against `blkpy serve`, and fio, on one
raw file in the page cache) and print the figures. Same as `blkpy bench`."""

from blkpy.benchmark import bench_command

if __name__ == "__main__":
    bench_command()
