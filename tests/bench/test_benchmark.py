"""The benchmark's helpers, the load generator's writes and latency histogram, and one
short end-to-end run (figures are not asserted: speed belongs in the report, not in tests)."""

import dataclasses
import json
import os
import resource
import shutil
import statistics
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from blkpy import ring as blkif
from blkpy.bench import benchmark as bench
from blkpy.bench.benchmark import BenchReport, Measurement, Pattern, Row, Run
from blkpy.gntdev.native import lib
from blkpy.sim.host import SimHost
from blkpy.sim.load_generator import HIST_BINS, percentiles, run_load

HAVE_FIO = shutil.which("fio") is not None
HAVE_QEMU_IMG = shutil.which("qemu-img") is not None


def make_run(side, pattern="randread 4k QD32", iops=100.0, **kw):
    return Run(pattern, side, 32, iops, iops * 4096 / 1e6, 1.0, {"x": 0.5}, 0.1, 1.2, **kw)


def report_of(*runs, rows=()):
    return BenchReport(1 << 20, 1.0, 2, [], list(runs), rows=list(rows))


def test_cpu_per_io():
    run = make_run("blkpy", iops=1000.0)  # 1000 I/Os in 1 s, 0.5 CPU-s
    assert run.cpu_us_per_io == {"x": 500.0}
    row = report_of(run).as_dict()["runs"][0]
    assert row["cpu_us_per_io"] == {"x": 500.0} and row["noisy"] is False
    assert "(500.0 us/IO)" in report_of(run).to_text()


def test_noisy_runs_are_flagged():
    assert not make_run("blkpy").noisy  # 0.1 CPU-s of others in 1.2 s
    loud = dataclasses.replace(make_run("blkpy"), foreign_cpu_seconds=0.5)
    assert loud.noisy and "(noisy)" in report_of(loud).to_text()


def test_measurements_take_medians_and_flag_noise_by_the_median():
    quiet = make_run("blkpy", iops=300.0)
    loud = dataclasses.replace(make_run("blkpy"), foreign_cpu_seconds=0.9)
    lat = [{"p50": v, "p99": 2 * v, "p99.9": 3 * v} for v in (10.0, 30.0, 20.0)]
    runs = [dataclasses.replace(r, latency_us=lt)
            for r, lt in zip([quiet, make_run("blkpy", iops=200.0), loud], lat, strict=True)]
    m = Measurement(runs)
    assert m.iops == 200.0  # of 300, 200, 100
    assert m.latency_us == {"p50": 20.0, "p99": 40.0, "p99.9": 60.0}
    assert m.cpu_us_per_io("x") == statistics.median(r.cpu_us_per_io["x"] for r in runs)
    assert not m.noisy  # one disturbed run of three
    assert Measurement([loud, loud, quiet]).noisy


@pytest.mark.skipif(shutil.which("fincore") is None, reason="no fincore")
def test_cached_fraction_after_warming(tmp_path):
    path = tmp_path / "f"
    bench.make_file(path, 4 << 20)
    bench.warm(path)
    assert bench.cached_fraction(path) == 1.0
    assert bench.cached_fraction(tmp_path / "missing") is None


def test_uncached_runs_are_flagged():
    cold = dataclasses.replace(make_run("blkpy"), cached_after=0.5)
    assert "only 50% of the file stayed cached" in report_of(cold).to_text()


def test_pattern_labels():
    assert Pattern("a", 4096, True, 32).label == "randread 4k QD32"
    assert Pattern("b", 1 << 20, False, 8).label == "seqread 1M QD8"
    assert Pattern("c", 4096, True, 32, write=True).label == "randwrite 4k QD32"
    assert Pattern("d", 4096, True, 32, disk="direct").label == "O_DIRECT randread 4k QD32"
    assert Pattern("e", 4096, True, 1, disk="qcow2").label == "qcow2 randread 4k QD1"


def test_every_row_has_a_unique_key_and_a_target():
    keys = [r.key for r in bench.ROWS]
    assert len(keys) == len(set(keys)) == 23
    assert all(r.comparison in (">=", "<=") for r in bench.ROWS)
    assert {r.pattern.label for r in bench.ROWS if r.group == "qcow2"} == {
        f"qcow2 {kind} 4k QD{d}" for kind in ("randread", "randwrite", "allocating seqwrite")
        for d in (1, 32)
    }


def test_rows_are_selected_by_key_or_group_in_report_order():
    assert [r.key for r in bench.select_rows(["seq1m,rand4k-qd1", "idle"])] == [
        "rand4k-qd1", "seq1m-qd8", "idle"]
    assert len(bench.select_rows(["qcow2"])) == 6
    assert bench.select_rows(None) == list(bench.ROWS) == bench.select_rows([""])
    with pytest.raises(ValueError, match="unknown row.*nope"):
        bench.select_rows(["rand4k,nope"])


def test_rows_pass_against_their_targets():
    def row(value, comparison=">=", **kw):
        return Row("k", "n", 1.0, 2.0, "fio psync", value, 0.9, comparison, **kw)

    assert row(0.9).passed and not row(0.89).passed
    assert row(1.3, "<=").passed is False and row(0.5, "<=").passed
    assert not row(None).passed and not row(1.0, errors=3).passed
    assert row(0.95).as_dict()["pass"] is True


def test_rows_text_has_target_mark_and_latency():
    rows = [
        Row("a", "randread 4k QD32 IOPS", 50.0, 100.0, "fio psync", 0.5, 0.9, ">=",
            pattern="randread 4k QD32", noisy=True,
            latency_us={"blkpy": {"p50": 10.0, "p99": 20.0, "p99.9": 30.0},
                        "fio psync": {"p50": 1.0, "p99": 2.0, "p99.9": 3.0}}),
        Row("b", "idle", 0.2, None, None, 0.2, 1.0, "<="),
        Row("c", "O_DIRECT", None, None, "fio io_uring", None, 0.9, ">=", skipped="no disk"),
    ]
    text = report_of(rows=rows).to_text().splitlines()
    assert text[-3].split()[-8:] == [
        "0.50", ">=", "0.90", "SHORT", "noisy", "10.0/20.0/30.0", "|", "1.00/2.00/3.00"]
    assert text[-2].split() == ["idle", "0.20", "-", "0.20", "<=", "1.00", "PASS"]
    assert text[-1].split()[-3:] == ["SKIPPED", "no", "disk"]


def test_ratios_pair_blkpy_with_each_peer_and_each_row():
    report = report_of(
        make_run("blkpy", iops=50.0),
        make_run("fio io_uring", iops=200.0),
        make_run("fio psync", pattern="randread 4k QD1", iops=100.0),
        make_run("fio psync", pattern="seqread 1M QD8"),  # no blkpy run: no ratio
        rows=[Row("rand4k-qd32", "n", 50.0, 100.0, "fio psync", 0.5, 0.9, ">=",
                  pattern="randread 4k QD32")],
    )
    assert report.ratios() == {"randread 4k QD32": {"fio psync": 0.5, "fio io_uring": 0.25}}
    out = json.loads(json.dumps(report.as_dict()))
    assert out["ratios"] == report.ratios()
    assert out["rows"][0]["pass"] is False and out["rows"][0]["target"] == 0.9


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
    st_ = os.stat(path)
    assert st_.st_size == 2 << 20 and st_.st_blocks * 512 >= 2 << 20
    bench.warm(path)


def test_direct_io_problem_names_memory_file_systems(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_fs_type", lambda _d: "tmpfs")
    assert "tmpfs" in bench.direct_io_problem(tmp_path)
    monkeypatch.undo()
    problem = bench.direct_io_problem(tmp_path)  # None where O_DIRECT works
    assert problem is None or "O_DIRECT" in problem or "tmpfs" in problem
    assert os.listdir(tmp_path) == []


# ---- the latency histogram -----------------------------------------------------------


def hist_of(samples):
    hist = np.zeros(HIST_BINS, dtype=np.uint64)
    for v in samples:
        hist[lib.simfront_hist_index(v)] += 1
    return hist


@given(st.integers(0, (1 << 37) - 1))
def test_histogram_bins_are_contiguous_and_narrow(v):
    i = lib.simfront_hist_index(v)
    low, high = lib.simfront_hist_lower(i), lib.simfront_hist_lower(i + 1)
    assert low <= v < high
    assert high - low <= max(low // 64, 1)


def test_histogram_overflow_lands_in_the_last_bin():
    assert lib.simfront_hist_index(1 << 40) == lib.simfront_hist_index((1 << 37) - 1) == HIST_BINS - 1


@given(st.lists(st.integers(0, 10**11), min_size=1, max_size=200),
       st.sampled_from([0.1, 1.0, 25.0, 50.0, 90.0, 99.0, 99.9, 100.0]))
def test_histogram_percentiles_match_numpy_within_the_bin_error(samples, p):
    got = percentiles(hist_of(samples), [p])[p]
    want = float(np.percentile(samples, p, method="inverted_cdf"))
    assert abs(got - want) <= want / 128  # exact below 128 ns


def test_empty_histogram_has_no_percentiles():
    assert percentiles(np.zeros(HIST_BINS, dtype=np.uint64)) == {}


# ---- the load generator writes -------------------------------------------------------


def test_write_load_reaches_the_file(tmp_path):
    path = tmp_path / "disk.raw"
    bench.make_file(path, 4 << 20)
    before = path.read_bytes()
    with SimHost() as host:
        guest = host.create_guest(bench.GUEST_DOMID)
        with bench.served_disk(host, guest, "raw", str(path), 0) as disk:
            result = run_load(disk.frontend, op=blkif.BLKIF_OP_WRITE, nbytes=8192, depth=4,
                              seconds=0.2, random=True, fill_byte=0xA5)
    # a response with another operation than WRITE would have raised ProtocolError
    assert result.completed > 0 and result.errors == 0
    assert int(result.latency_hist.sum()) == result.completed
    assert set(result.latency_us()) == {"p50", "p99", "p99.9"}
    after = np.frombuffer(path.read_bytes(), dtype=np.uint8).reshape(-1, 8192)
    changed = np.flatnonzero(np.any(after != np.frombuffer(before, np.uint8).reshape(-1, 8192), 1))
    assert 0 < len(changed) <= result.completed
    assert np.all(after[changed] == 0xA5)  # whole requests of the fill byte, nothing else


def test_writes_to_a_read_only_disk_are_refused(tmp_path):
    class ReadOnlyRing:
        info = dataclasses.make_dataclass("I", ["readonly", "size"])(True, 1 << 20)

    with pytest.raises(ValueError, match="read-only"):
        run_load(ReadOnlyRing(), op=blkif.BLKIF_OP_WRITE, nbytes=4096, depth=1, seconds=0.1,
                 random=True)


# ---- end to end and the command line -------------------------------------------------


@pytest.mark.skipif(not (HAVE_FIO and HAVE_QEMU_IMG), reason="fio or qemu-img not installed")
def test_short_benchmark_json(tmp_path):
    args = ["--rows", "rand4k-qd1,idle,memory", "--rows", "qcow2-alloc-qd1,direct",
            "--seconds", "0.2",
            "--size-mb", "8", "--idle-seconds", "0.2", "--workdir", str(tmp_path), "--json"]
    result = CliRunner().invoke(bench.bench_command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{"):])  # click < 8.2 mixes in stderr
    rows = {row["key"]: row for row in out["rows"]}
    assert list(rows) == ["rand4k-qd1", "idle", "memory", "direct4k-qd32", "qcow2-alloc-qd1"]
    for row in rows.values():
        assert {"name", "blkpy", "peer", "value", "target", "comparison", "pass"} <= set(row)
        assert isinstance(row["pass"], bool) and row["comparison"] in (">=", "<=")
    assert rows["rand4k-qd1"]["value"] > 0 and rows["rand4k-qd1"]["target"] == 0.4
    assert set(rows["rand4k-qd1"]["latency_us"]) == {"blkpy", "fio psync"}
    assert rows["idle"]["value"] >= 0 and rows["idle"]["comparison"] == "<="
    assert 5 < rows["memory"]["value"] < 500 and "PSS" in rows["memory"]["name"]
    assert rows["qcow2-alloc-qd1"]["peer_side"] == "qemu-img bench"
    direct = rows["direct4k-qd32"]
    assert direct["skipped"] or direct["value"] > 0  # skipped on tmpfs, with the reason
    assert out["ratios"]["randread 4k QD1"]["fio psync"] == rows["rand4k-qd1"]["value"]
    assert "qcow2 allocating seqwrite 4k QD1" in out["ratios"]
    assert all(r["errors"] == 0 and r["iops"] > 0 for r in out["runs"])
    assert os.listdir(tmp_path) == []  # the test files are removed


def test_plot_without_matplotlib_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    result = CliRunner().invoke(bench.bench_command, ["--plot", str(tmp_path / "p.png")])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        "Error: --plot needs matplotlib: install blkpy with its `plot` extra"]
    assert not (tmp_path / "p.png").exists()


def test_plot_draws_iops_and_p99_against_depth(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [make_run(side, bench.rand4k(d).label, iops=1000.0 * d,
                     latency_us={"p50": d, "p99": 2.0 * d, "p99.9": 3.0 * d})
            for d in bench.SWEEP_DEPTHS for side in ("blkpy", "fio io_uring")]
    runs.append(make_run("fio psync", bench.rand4k(1).label, latency_us={"p99": 1.0}))
    path = tmp_path / "sweep.png"
    bench.plot_sweep(report_of(*runs), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_qos_rows_measure_a_limited_disk_and_its_neighbour(tmp_path):
    from blkpy.bench.qos_row import QOS_LIMIT_IOPS, measure_qos

    files = (tmp_path / "a.raw", tmp_path / "b.raw")
    for f in files:
        f.write_bytes(bytes(16 << 20))
    q = measure_qos(files, 0.3, [], 50, lambda _m: None)
    assert q.errors == 0 and q.limit == QOS_LIMIT_IOPS
    assert q.limited > 0 and q.neighbour_alone > 0 and q.neighbour_shared > 0
    report = bench.BenchReport(16 << 20, 0.3, 2, [], [])
    b = bench._Bench(bench._plan([], False, False), 0.3, 1, 50, None, lambda _m: None)
    b.qos = q
    rows = [b.row(s, None, 1.0, {}) for s in bench.select_rows(["qos"])]
    assert [r.key for r in rows] == ["qos-limit", "qos-neighbour"]
    assert rows[0].value == q.deviation and rows[1].value == q.neighbour_ratio
    report.rows = rows
    assert "QoS: limited disk IOPS" in report.to_text()
