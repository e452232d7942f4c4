"""Workloads and the disk model: they pass on a correct backend and catch broken ones."""

import json

import numpy as np
import pytest
from frontend_fakes import ring_pair

from blkpy.sim.disk_model import CHUNK, DiskModel
from blkpy.sim.guest import create_sim_dir, remove_sim_dir
from blkpy.sim.workloads import WorkloadSummary, run_workload

SECTORS = 8192  # 4 MiB


@pytest.fixture
def sim_dir():
    path = create_sim_dir()
    yield path
    remove_sim_dir(path)


@pytest.fixture
def pair(sim_dir, request):
    guest, fr, be = ring_pair(sim_dir, sectors=SECTORS, **getattr(request, "param", {}))
    yield fr, be
    be.stop()
    guest.close()


# ---- disk model ----------------------------------------------------------------------


def test_model_learns_unknown_data_once():
    m = DiskModel(4 * CHUNK)
    first = np.full(1024, 7, np.uint8)
    assert m.check(CHUNK - 512, first) == 0  # unknown: adopted
    assert m.check(CHUNK - 512, first) == 0
    changed = first.copy()
    changed[600] = 8
    assert m.check(CHUNK - 512, changed) == 1


def test_model_writes_and_discards():
    m = DiskModel(2 * CHUNK, zeroed=True)
    assert m.check(0, np.zeros(4096, np.uint8)) == 0
    assert m.check(0, np.ones(512, np.uint8)) == 512
    data = np.arange(2048, dtype=np.uint16).view(np.uint8)
    m.write(CHUNK - 2048, data)  # straddles two chunks
    assert m.check(CHUNK - 2048, data) == 0
    assert np.array_equal(m.expected(CHUNK - 2048, 4096), data)
    m.discard(CHUNK - 1024, 1024, reads_zero=True)
    assert m.check(CHUNK - 1024, np.zeros(1024, np.uint8)) == 0
    m.discard(0, 512, reads_zero=False)
    assert m.check(0, np.full(512, 9, np.uint8)) == 0  # unknown again: anything goes


def test_model_rejects_unaligned_ranges():
    m = DiskModel(CHUNK)
    with pytest.raises(ValueError):
        m.write(100, b"x" * 512)
    with pytest.raises(ValueError):
        m.check(CHUNK, b"x" * 512)


# ---- workloads on a toy backend -------------------------------------------------------------


@pytest.mark.parametrize(
    "pair",
    [
        {},
        {"abi": "x86_32-abi", "order": 2, "persistent": True},
        {"max_indirect_segments": 0},
        {"sector_size": 4096, "physical_sector_size": 4096},
        {"flush": False, "barrier": False, "discard": False},
    ],
    indirect=True,
)
@pytest.mark.parametrize("name", ["verify", "randrw"])
def test_workloads_pass_on_a_correct_backend(pair, name):
    fr, _be = pair
    s = run_workload(fr, name, requests=300, seed=3, zeroed=True)
    assert s.ok, s.to_text()
    assert s.total_requests >= 300
    assert s.bytes_read and s.bytes_written
    indirect = fr.info.max_indirect_segments > 0
    assert (s.indirect_requests > 0) == indirect
    for op, feature in (("flush", "flush"), ("barrier", "barrier"), ("discard", "discard")):
        assert (s.requests.get(op, 0) > 0) == getattr(fr.info, feature)


def test_verify_covers_the_span_and_checks_every_byte(pair):
    fr, be = pair
    span = 1 << 20
    model = DiskModel(SECTORS * 512, zeroed=True)
    s = run_workload(fr, "verify", requests=600, seed=1, span=span, model=model)
    assert s.ok
    assert s.bytes_written >= span  # more than one pass over the span
    assert s.bytes_read % span == 0 and s.bytes_read >= span  # whole sweeps
    # what the workload believes is what the disk holds
    assert bytes(be.disk[:span]) == model.expected(0, span).tobytes()
    assert not any(be.disk[span:])


@pytest.mark.parametrize("pair", [{"readonly": True}], indirect=True)
@pytest.mark.parametrize("name", ["verify", "randrw"])
def test_readonly_disk_refuses_writes(pair, name):
    fr, be = pair
    be.disk[:] = np.random.default_rng(0).bytes(len(be.disk))
    before = bytes(be.disk)
    s = run_workload(fr, name, requests=200, seed=2)
    assert s.ok, s.to_text()
    assert s.expected_errors > 0 and s.bytes_written == 0
    assert bytes(be.disk) == before


def test_corrupt_reads_are_mismatches(pair):
    fr, be = pair
    be.corrupt_reads = True
    s = run_workload(fr, "verify", requests=100, seed=1, zeroed=True)
    assert not s.ok and s.mismatches > 0 and s.mismatched_bytes >= s.mismatches


def test_a_discard_that_does_not_zero_is_caught(pair):
    fr, be = pair
    be.ignore_discard = True
    s = run_workload(fr, "verify", requests=400, seed=1, zeroed=True)
    assert s.requests["discard"] > 0
    assert s.mismatches > 0


@pytest.mark.parametrize("pair", [{"readonly": True}], indirect=True)
def test_a_readonly_disk_that_accepts_writes_is_caught(pair):
    fr, be = pair
    be.readonly = False  # advertises VDISK_READONLY yet writes
    s = run_workload(fr, "randrw", requests=100, seed=1)
    assert s.errors > 0 and not s.ok


def test_protocol_errors_end_the_workload(pair):
    fr, be = pair
    be.wrong_operation = True
    s = run_workload(fr, "randrw", requests=100, seed=1)
    assert s.protocol_errors and "wrong operation" in s.protocol_errors[0]
    assert not s.ok


def test_refused_flushes_are_counted_and_stop(pair):
    fr, be = pair
    be.refuse_flush = True
    s = run_workload(fr, "randrw", requests=300, seed=1, zeroed=True)
    assert s.ok and s.unsupported >= 1
    assert not fr.supports(3)


def test_summary_serialises():
    s = WorkloadSummary("verify", requests={"read": 2, "write": 1}, mismatches=1)
    d = json.loads(json.dumps(s.as_dict()))
    assert d["total_requests"] == 3 and d["ok"] is False
    text = s.to_text()
    assert "FAILED" in text and "read 2" in text


def test_unknown_workload(pair):
    fr, _be = pair
    with pytest.raises(ValueError):
        run_workload(fr, "nope")


@pytest.mark.parametrize("secure", [False, True])
def test_secure_discards_only_when_offered(sim_dir, secure):
    guest, fr, be = ring_pair(sim_dir, sectors=SECTORS, discard_secure=secure)
    try:
        s = run_workload(fr, "randrw", requests=300, seed=1, zeroed=True)
        assert s.ok and s.requests["discard"] > 1
        slots = np.concatenate([b.view(fr.abi.raw) for b in be.seen]).view(fr.abi.discard)
        flags = slots["flag"][slots["operation"] == 5]
        assert (flags == 1).any() == secure and set(flags.tolist()) <= {0, 1}
    finally:
        be.stop()
        guest.close()
