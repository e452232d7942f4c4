"""`blkpy fuzz crashes`: the CI version finds nothing, and its judges do catch what they
are there to catch (lost flushed writes, garbage, errors on failing storage)."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from qemu_img import needs_qemu

from blkpy.fuzz import FindingLog, crashes
from blkpy.fuzz.crashes import (
    DISCARD,
    ERROR,
    FLUSH,
    OKAY,
    READ,
    SECTOR,
    WRITE,
    FaultyStorage,
    Storm,
    WriteOracle,
    fault_layer_missing,
)
from blkpy.ring import BLKIF_RSP_EOPNOTSUPP as EOPNOTSUPP
from blkpy.sim.blkfront_ring import Completion
from blkpy.sim.host import SimHost

MISSING = fault_layer_missing()
needs_fault_layer = pytest.mark.skipif(MISSING is not None, reason=f"host faults: {MISSING}")


# ---- the oracle ------------------------------------------------------------------------


def _sectors(byte: int, n: int = 1) -> bytes:
    return bytes([byte]) * SECTOR * n


def test_oracle_keeps_flushed_writes_and_allows_later_ones():
    oracle = WriteOracle(bytes(4 * SECTOR))
    a = oracle.write(0, _sectors(1, 2))
    oracle.complete(a, ok=True)
    flush = oracle.flush_submitted()
    b = oracle.write(SECTOR, _sectors(2))  # in flight when the flush was submitted
    oracle.flush_completed(flush, ok=True)
    oracle.complete(b, ok=True)
    image = _sectors(1) + _sectors(2) + bytes(2 * SECTOR)
    assert oracle.mismatches(image, durable_only=True) == []
    assert oracle.mismatches(_sectors(1, 2) + bytes(2 * SECTOR), durable_only=True) == []
    # b was acknowledged, so a live read must see it; a crash may lose it
    assert oracle.mismatches(_sectors(1, 2) + bytes(2 * SECTOR), durable_only=False) == [1]


def test_oracle_flags_lost_flushed_write_and_garbage():
    oracle = WriteOracle(bytes(4 * SECTOR))
    a = oracle.write(SECTOR, _sectors(1, 2))
    oracle.complete(a, ok=True)
    oracle.flush_completed(oracle.flush_submitted(), ok=True)
    assert oracle.mismatches(bytes(4 * SECTOR), durable_only=True) == [1, 2]
    garbage = bytes(SECTOR) + _sectors(1, 2) + _sectors(9)  # never written sector 3
    assert oracle.mismatches(garbage, durable_only=True) == [3]


def test_oracle_failed_flush_and_failed_write_promise_nothing():
    oracle = WriteOracle(bytes(SECTOR))
    a = oracle.write(0, _sectors(1))
    oracle.complete(a, ok=True)
    oracle.flush_completed(oracle.flush_submitted(), ok=False)
    assert oracle.mismatches(bytes(SECTOR), durable_only=True) == []
    b = oracle.write(0, _sectors(2))
    oracle.complete(b, ok=False)
    oracle.flush_completed(oracle.flush_submitted(), ok=True)
    # a is durable; the failed b may or may not have landed
    assert oracle.mismatches(_sectors(1), durable_only=True) == []
    assert oracle.mismatches(_sectors(2), durable_only=True) == []
    assert oracle.mismatches(bytes(SECTOR), durable_only=True) == [0]


# ---- the storm's verdicts on answers -------------------------------------------------


class _Ring:
    """Just what Storm reads of a ring before any request."""

    size = 32

    class info:  # noqa: N801 - stands in for DiskInfo
        size = 1 << 20
        discard_granularity = 4096
        sector_size = 512


def _storm() -> tuple[Storm, FindingLog]:
    log = FindingLog("crashes", 0)
    storm = Storm([_Ring()], WriteOracle(bytes(1 << 20)), np.random.default_rng(0), log,  # type: ignore[list-item]
                  "unit")
    return storm, log


def _answer(storm: Storm, op: int, offset: int, nbytes: int, status: int,
            data: bytes | None = None) -> None:
    p = crashes._Pending(op, offset, nbytes, storm.oracle.tick(),
                         expect=storm.expect(op, offset, nbytes))
    if op == WRITE:
        p.version = storm.oracle.write(offset, data or bytes(nbytes))
    elif op == DISCARD:
        p.version = storm.oracle.discard(offset, nbytes)
    arr = None if data is None else np.frombuffer(data, dtype=np.uint8)
    storm._complete(Completion(0, op, offset // SECTOR, nbytes, status, arr), p)


def test_storm_flags_errors_without_fault_and_success_on_failing_storage():
    storm, log = _storm()
    _answer(storm, WRITE, 0, 4096, ERROR)
    assert log.total == 1 and "spurious error" in log.findings[0].problem
    storm.fault, storm.fault_ranges = "ranges", [(8192, 12288)]
    _answer(storm, WRITE, 4096, 4096, ERROR)  # outside the failing range
    _answer(storm, WRITE, 8192, 512, OKAY)  # inside: its data cannot have been stored
    _answer(storm, WRITE, 8192, 512, ERROR)  # as it should be
    _answer(storm, READ, 0, 512, OKAY, bytes(512))
    assert [f.problem.split(":")[0] for f in log.findings] == [
        "spurious error", "spurious error", "lost error"]


def test_storm_lets_a_read_fail_that_shares_a_host_page_with_failing_bytes():
    # the host page cache reads the fault layer's file a page at a time: a read beside the
    # failing bytes fails with them (a flaky "spurious error" before the judge knew it)
    storm, log = _storm()
    page = crashes.HOST_PAGE
    storm.fault, storm.fault_ranges = "ranges", [(2 * page + page - SECTOR, 3 * page)]
    _answer(storm, READ, 2 * page, SECTOR, ERROR)  # the same page: the host's error
    _answer(storm, READ, 2 * page - SECTOR, 2 * SECTOR, ERROR)  # straddles into it
    _answer(storm, READ, 2 * page, SECTOR, OKAY, bytes(SECTOR))  # or a cached page
    assert log.total == 0
    _answer(storm, READ, page, SECTOR, ERROR)  # the page before: nothing failed there
    _answer(storm, WRITE, 2 * page, SECTOR, ERROR)  # writes reach the layer byte for byte
    assert [f.problem.split(":")[0] for f in log.findings] == ["spurious error"] * 2
    assert "host failing 0x" in log.findings[0].problem


def test_storm_takes_unsupported_discard_for_what_it_is():
    storm, log = _storm()
    _answer(storm, DISCARD, 0, 4096, EOPNOTSUPP)
    assert log.total == 0
    _answer(storm, READ, 0, 4096, EOPNOTSUPP, bytes(4096))
    assert log.total == 1 and "bad status" in log.findings[0].problem


def test_storm_flags_reads_no_write_explains():
    storm, log = _storm()
    _answer(storm, READ, 0, 1024, OKAY, bytes(512) + b"\x01" * 512)
    assert log.total == 1 and "wrong data" in log.findings[0].problem


def test_after_a_lost_sync_only_flushes_and_qcow2_writes_may_keep_failing():
    storm, log = _storm()
    storm.sync_lost, storm.raw = True, False
    _answer(storm, FLUSH, 0, 0, ERROR)
    _answer(storm, WRITE, 0, 512, ERROR)  # a qcow2 image stops taking writes
    assert log.total == 0
    _answer(storm, READ, 0, 512, ERROR)  # reads go on
    storm.raw = True
    _answer(storm, WRITE, 0, 512, ERROR)  # raw writes go on
    assert log.total == 2


# ---- the fault layer ---------------------------------------------------------------------


@needs_fault_layer
def test_faulty_storage_fails_exactly_where_told(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    storage = FaultyStorage(str(image), str(tmp_path))
    try:
        fd = os.open(storage.path, os.O_RDWR)
        try:
            os.pwrite(fd, b"a" * 4096, 0)
            storage.set_faults("ranges", [(8192, 16384)])
            os.pwrite(fd, b"b" * 4096, 4096)
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"c" * 4096, 12288)
            assert exc.value.errno == errno.EIO
            os.fsync(fd)  # ranges never fail a flush
            storage.set_faults("every")
            with pytest.raises(OSError):
                os.fsync(fd)
            storage.set_faults(None)
            os.pwrite(fd, b"d" * 4096, 12288)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        storage.stop()
    data = image.read_bytes()
    assert data[:8192] == b"a" * 4096 + b"b" * 4096 and data[12288:16384] == b"d" * 4096


@needs_fault_layer
def test_faulty_storage_reads_whole_host_pages(tmp_path):
    """What Storm.expect allows for: a read beside failing bytes fails when they share a
    host page (the page cache fetches the whole page); writes and other pages do not."""
    page = crashes.HOST_PAGE
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * page))
    storage = FaultyStorage(str(image), str(tmp_path))
    try:
        fd = os.open(storage.path, os.O_RDWR)
        try:
            storage.set_faults("ranges", [(3 * page - SECTOR, 3 * page)])
            with pytest.raises(OSError) as exc:
                os.pread(fd, SECTOR, 2 * page)  # not cached: the whole page is fetched
            assert exc.value.errno == errno.EIO
            assert os.pread(fd, SECTOR, page) == bytes(SECTOR)
            os.pwrite(fd, b"e" * SECTOR, 2 * page)
        finally:
            os.close(fd)
    finally:
        storage.stop()
    assert image.read_bytes()[2 * page:2 * page + SECTOR] == b"e" * SECTOR


# ---- the campaign ------------------------------------------------------------------------


@needs_qemu
def test_ci_campaign_finds_nothing():
    messages: list[str] = []
    result = crashes.run(seed=20261130, scale=1.0, progress=messages.append)
    assert [f.line() for f in result.findings] == []
    assert result.figures["qcow2_kills"] == crashes.QCOW2_MIN
    assert result.figures["raw_kills"] == crashes.RAW_MIN
    assert result.count == crashes.QCOW2_MIN + crashes.RAW_MIN
    assert result.figures["in_flight_at_kill"] > 0  # the kills landed mid-storm
    if MISSING is None:
        assert result.figures["fault_cases"] == crashes.FAULT_MIN
        assert result.figures["fault_errors"] > 0  # the guest did see the host's errors
    else:
        assert result.figures["faults_skipped"] == MISSING


@needs_qemu
@needs_fault_layer
@pytest.mark.parametrize("fmt,mode", [("qcow2", "writes"), ("qcow2", "every"),
                                      ("raw", "ranges"), ("raw", "writes"), ("raw", "every")])
def test_fault_case_of_each_kind(tmp_path, fmt, mode):
    """Each kind of host fault on each format it applies to, whatever the campaign's
    seed picks."""
    log = FindingLog("crashes", 7)
    tally = crashes._Tally()
    with SimHost() as host:
        crashes.fault_case(host, str(tmp_path), fmt, 0, 7, log, tally, mode=mode)
    assert [f.line() for f in log.findings] == []
    assert tally.fault_cases == 1 and tally.fault_errors > 0
