#!/usr/bin/env python3
"""Run blkpy's first benchmark (the simulated guest against `blkpy serve`, and fio, on one
raw file in the page cache) and print the figures. Same as `blkpy bench`."""

from __future__ import annotations

import json

import click

from blkpy.benchmark import run_benchmark


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
def main(as_json: bool, **options: object) -> None:
    """Measure blkpy against fio on the same file and patterns."""
    report = run_benchmark(echo=lambda msg: click.echo(msg, err=True), **options)
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.to_text())


if __name__ == "__main__":
    main()
