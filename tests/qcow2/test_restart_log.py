"""The restart record's format (blkpy.qcow2.restart_log): what is written is read back,
and anything torn or foreign is refused rather than applied to an image."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from blkpy.qcow2.plan import Resize, Write
from blkpy.qcow2.restart_log import RestartLog, decode, encode

ops = st.one_of(
    st.builds(Write, st.integers(0, 2**63 - 1), st.binary(max_size=300)),
    st.builds(Resize, st.integers(0, 2**63 - 1)),
)
phases = st.lists(st.lists(ops, max_size=5), max_size=5)
image_ids = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))


@given(st.integers(0, 2**64 - 1), image_ids, phases)
def test_a_record_reads_back_as_written(gen, image_id, p):
    assert decode(encode(gen, image_id, p)) == (gen, image_id, p)


@given(image_ids, phases, st.data())
def test_a_torn_or_damaged_record_is_refused(image_id, p, data):
    blob = encode(7, image_id, p)
    cut = data.draw(st.integers(0, len(blob) - 1))
    assert decode(blob[:cut]) is None  # killed while writing it
    pos = data.draw(st.integers(0, len(blob) - 1))
    flipped = bytearray(blob)
    flipped[pos] ^= 1 << data.draw(st.integers(0, 7))
    assert decode(bytes(flipped)) is None


@given(st.binary(max_size=200))
def test_garbage_is_never_a_record(buf):
    assert decode(buf) is None


def test_the_newest_record_of_the_image_wins_and_a_torn_one_falls_back(tmp_path):
    path = str(tmp_path / "rec")
    log = RestartLog(path, (1, 2))
    log.record([[Write(0, b"one")]])
    log.record([[Write(0, b"two")]])
    assert RestartLog(path, (1, 2)).latest() == [[Write(0, b"two")]]
    assert RestartLog(path, (1, 3)).latest() is None  # another image's file
    with open(f"{path}.0", "r+b") as f:  # generation 2's slot, torn
        f.truncate(10)
    assert RestartLog(path, (1, 2)).latest() == [[Write(0, b"one")]]
    log.clear()
    assert RestartLog(path, (1, 2)).latest() is None and not log.live
