"""A qcow2 image's metadata that only a dead serve's memory held: its successor (opened with
take_over) applies the restart record and reads every write the guest was answered for;
any other open drops the record."""

from __future__ import annotations

import os

from qemu_img import as_raw, check_clean, needs_qemu, qemu_img

from blkpy.backends.qcow2 import Qcow2Disk

CLUSTER = 65536


def _fresh(tmp_path) -> tuple[str, str]:
    """An empty 1 MiB image and where its restart record goes."""
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "1M")
    return str(image), str(tmp_path / "qcow2-metadata")


def _no_record(log: str) -> bool:
    return not os.path.exists(log) and not os.path.exists(log + ".new")


def _abandon(disk: Qcow2Disk) -> None:
    """What SIGKILL leaves: the file as written so far, no write-back, no close."""
    os.close(disk._fd)
    disk._fd = -1


@needs_qemu
def test_a_successor_keeps_writes_the_dead_process_never_wrote_back(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * (4 * CLUSTER // 256))
    image = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(image))
    log = str(tmp_path / "run" / "qcow2-metadata")
    first = Qcow2Disk(str(image), restart_log=log)
    first.writev(CLUSTER + 4096, [memoryview(b"\x11" * 4096)])  # copy-on-write from base
    assert first.map_for_write(3 * CLUSTER, 4096)  # the native loop's allocating path
    with open(image, "r+b") as f:  # the loop's own write of the guest's bytes
        host = first.meta.fast_runs(3 * CLUSTER, 4096, write=True)[0][0]
        f.seek(host)
        f.write(b"\x22" * 4096)
    _abandon(first)
    assert os.path.exists(log)

    second = Qcow2Disk(str(image), restart_log=log, take_over=True)
    got = bytearray(4 * CLUSTER)
    second.readv(0, [memoryview(got)])
    expect = bytearray(base.read_bytes())
    expect[CLUSTER + 4096:CLUSTER + 8192] = b"\x11" * 4096
    expect[3 * CLUSTER:3 * CLUSTER + 4096] = b"\x22" * 4096
    assert got == expect
    second.close()
    assert _no_record(log)
    check_clean(str(image))
    assert as_raw(str(image), str(tmp_path / "out.raw")) == bytes(expect)


@needs_qemu
def test_an_open_that_is_no_take_over_drops_the_record(tmp_path):
    image, log = _fresh(tmp_path)
    first = Qcow2Disk(image, restart_log=log)
    first.writev(0, [memoryview(b"\x33" * 4096)])
    _abandon(first)
    fresh = Qcow2Disk(image, restart_log=log)  # not a successor: the guest is gone
    got = bytearray(4096)
    fresh.readv(0, [memoryview(got)])
    assert got == bytes(4096)  # never flushed, never applied
    assert _no_record(log)
    fresh.close()


@needs_qemu
def test_a_flush_leaves_nothing_to_take_over(tmp_path):
    image, log = _fresh(tmp_path)
    disk = Qcow2Disk(image, restart_log=log)
    disk.writev(0, [memoryview(b"\x44" * 4096)])
    assert os.path.exists(log)  # the allocation's record
    disk.flush()
    assert _no_record(log)
    disk.writev(0, [memoryview(b"\x55" * 4096)])  # a rewrite in place: no metadata
    assert _no_record(log)
    disk.close()


@needs_qemu
def test_a_successor_keeps_writes_spread_over_several_tables(tmp_path):
    """Records after the first carry only the tables that changed since: allocations that
    alternate between L2 tables must all be in what the successor applies."""
    image = tmp_path / "wide.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "2G")
    log = str(tmp_path / "run" / "qcow2-metadata")
    first = Qcow2Disk(str(image), restart_log=log)
    table_span = 512 << 20  # guest bytes one 64 KiB L2 table maps
    spots = [t * table_span + k * 7 * CLUSTER for k in range(4) for t in (0, 2, 1)]
    for i, spot in enumerate(spots):
        with first.mapping_batch():
            assert first.map_for_write(spot, 4096)
        host = first.meta.fast_runs(spot, 4096, write=True)[0][0]
        os.pwrite(first._fd, bytes([i + 1]) * 4096, host)  # the loop's own write
    _abandon(first)

    second = Qcow2Disk(str(image), restart_log=log, take_over=True)
    for i, spot in enumerate(spots):
        got = bytearray(4096)
        second.readv(spot, [memoryview(got)])
        assert got == bytes([i + 1]) * 4096, hex(spot)
    second.close()
    check_clean(str(image))
