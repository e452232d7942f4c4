"""The benchmark's helpers and one short end-to-end run (figures are not asserted: speed
belongs in the report, not in tests)."""

import dataclasses
import json
import os
import resource
import shutil

import pytest

from blkpy import benchmark as bench
from blkpy.benchmark import BenchReport, Pattern, Run


def make_run(side, pattern="randread 4k QD32", iops=100.0):
    return Run(pattern, side, 32, iops, iops * 4096 / 1e6, 1.0, {"x": 0.5}, 0.1, 1.2)


def test_cpu_per_io():
    run = make_run("blkpy", iops=1000.0)  # 1000 I/Os in 1 s, 0.5 CPU-s
    assert run.cpu_us_per_io == {"x": 500.0}
    row = BenchReport(1, 1.0, 2, [], [run]).as_dict()["runs"][0]
    assert row["cpu_us_per_io"] == {"x": 500.0} and row["noisy"] is False
    assert "(500.0 us/IO)" in BenchReport(1, 1.0, 2, [], [run]).to_text()


def test_noisy_runs_are_flagged():
    assert not make_run("blkpy").noisy  # 0.1 CPU-s of others in 1.2 s
    loud = dataclasses.replace(make_run("blkpy"), foreign_cpu_seconds=0.5)
    assert loud.noisy and "(noisy)" in BenchReport(1, 1.0, 2, [], [loud]).to_text()


@pytest.mark.skipif(shutil.which("fincore") is None, reason="no fincore")
def test_cached_fraction_after_warming(tmp_path):
    path = tmp_path / "f"
    bench.make_file(path, 4 << 20)
    bench.warm(path)
    assert bench.cached_fraction(path) == 1.0
    assert bench.cached_fraction(tmp_path / "missing") is None


def test_uncached_runs_are_flagged():
    cold = dataclasses.replace(make_run("blkpy"), cached_after=0.5)
    assert "only 50% of the file stayed cached" in BenchReport(1, 1.0, 2, [], [cold]).to_text()


def test_pattern_labels():
    assert Pattern("a", 4096, True, 32).label == "randread 4k QD32"
    assert Pattern("b", 1 << 20, False, 8).label == "seqread 1M QD8"


def test_ratios_pair_blkpy_with_each_fio_side():
    report = BenchReport(1 << 20, 1.0, 2, [], [
        make_run("blkpy", iops=50.0),
        make_run("fio psync", iops=100.0),
        make_run("fio io_uring", iops=200.0),
        make_run("fio psync", pattern="seqread 1M QD8"),  # no blkpy run: no ratio
    ])
    assert report.ratios() == {"randread 4k QD32": {"fio psync": 0.5, "fio io_uring": 0.25}}
    text = report.to_text()
    assert "ratio blkpy : fio, randread 4k QD32: fio psync 0.50, fio io_uring 0.25" in text
    assert json.loads(json.dumps(report.as_dict()))["ratios"] == report.ratios()


def test_process_cpu_seconds_match_getrusage():
    sum(range(3_000_000))  # some CPU time to compare
    ru = resource.getrusage(resource.RUSAGE_SELF)
    from_proc = bench._process_cpu_seconds(os.getpid())
    assert from_proc > 0
    assert abs(from_proc - (ru.ru_utime + ru.ru_stime)) < 0.1  # clock-tick granularity
    assert bench._host_busy_seconds() >= from_proc - 0.1  # every CPU second of ours is in it


def test_make_file_is_not_sparse_and_warm_reads_it(tmp_path):
    path = tmp_path / "f"
    bench.make_file(path, 2 << 20)
    st = os.stat(path)
    assert st.st_size == 2 << 20 and st.st_blocks * 512 >= 2 << 20
    bench.warm(path)


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")
def test_short_benchmark_end_to_end(tmp_path):
    report = bench.run_benchmark(size_mb=8, seconds=0.3, fio_engines=("psync",),
                                 workdir=str(tmp_path))
    sides = [(r.pattern, r.side) for r in report.runs]
    assert sides == [("randread 4k QD32", "blkpy"), ("randread 4k QD32", "fio psync"),
                     ("seqread 1M QD8", "blkpy"), ("seqread 1M QD8", "fio psync")]
    for run in report.runs:
        assert run.iops > 0 and run.errors == 0
        assert run.cached_after is None or 0 <= run.cached_after <= 1
    blkpy_runs = [r for r in report.runs if r.side == "blkpy"]
    for run in blkpy_runs:
        assert set(run.cpu_seconds) == {"backend", "generator"}
        assert "backend map_calls" in run.per_request and "guest notifies" in run.per_request
    assert set(report.ratios()) == {"randread 4k QD32", "seqread 1M QD8"}
    assert os.listdir(tmp_path) == []  # the test file is removed
