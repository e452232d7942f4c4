"""blkpy.rehearsal: a takeover's first runs, on throwaway objects, beside a serving process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blkpy.backends import open_disk
from blkpy.engine import ENGINES, make_engine
from blkpy.qcow2.layout import CreateOptions, new_image
from blkpy.rehearsal import IdleChannel, rehearse_queue, rehearse_reads
from blkpy.sim.hypervisor import create_sim_dir, remove_sim_dir
from blkpy.sim.platform import SimPlatform


def _image(tmp_path: Path, fmt: str) -> Path:
    path = tmp_path / f"disk.{fmt}"
    if fmt == "raw":
        path.write_bytes(b"\xa5" * (4 << 20))
    else:
        path.write_bytes(new_image(CreateOptions(size=4 << 20)))
    return path


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def platform():
    sim_dir = create_sim_dir()
    try:
        yield SimPlatform(sim_dir, xenstore_path="unused")
    finally:
        remove_sim_dir(sim_dir)


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_queue_is_rehearsed_to_its_sleep_and_leaves_nothing_behind(platform, tmp_path, fmt,
                                                                    engine):
    """The queue's thread runs its loop until it sleeps for want of requests, then all of
    it is closed: no descriptor is left, the image's bytes are as they were, and the
    engine (its owner's) still reads."""
    image = _image(tmp_path, fmt)
    before = image.read_bytes()
    disk = open_disk(str(image), fmt, readonly=True)
    io = make_engine(engine, disk)
    try:
        fds = _open_fds()
        for _ in range(2):
            assert rehearse_queue(platform, 1, disk, io, grant_mode="map", poll_us=50,
                                  max_persistent_grants=64)
        assert _open_fds() == fds
        assert rehearse_reads(io, disk.size)
    finally:
        io.close()
        disk.close()
    assert image.read_bytes() == before


@pytest.mark.parametrize("grant_mode", ["map", "copy"])
def test_a_queue_is_rehearsed_in_either_grant_mode(platform, tmp_path, grant_mode):
    disk = open_disk(str(_image(tmp_path, "raw")), "raw", readonly=True)
    io = make_engine("sync", disk)
    try:
        assert rehearse_queue(platform, 1, disk, io, grant_mode=grant_mode, poll_us=0,
                              max_persistent_grants=64)
    finally:
        io.close()
        disk.close()


def test_reads_are_rehearsed_only_on_an_image_of_two_pages_or_more(tmp_path):
    small = tmp_path / "small.raw"
    small.write_bytes(bytes(4096))
    disk = open_disk(str(small), "raw", readonly=True)
    io = make_engine("sync", disk)
    try:
        assert not rehearse_reads(io, disk.size)
    finally:
        io.close()
        disk.close()


def test_an_idle_channel_never_polls_readable_and_says_when_it_is_waited_on() -> None:
    channel = IdleChannel()
    assert not channel.waited.is_set()
    fd = channel.fileno()
    assert channel.waited.is_set()
    with pytest.raises(BlockingIOError):
        os.eventfd_read(fd)
    channel.notify()
    assert channel.ack() is False
    channel.close()
    channel.close()  # idempotent
    with pytest.raises(OSError):
        os.fstat(fd)
