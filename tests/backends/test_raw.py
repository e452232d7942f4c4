"""Raw images: once a sync failed, no flush may succeed again (the kernel may have dropped
the pages it could not write and will not say so twice), on every path a flush takes."""

import errno
import os

import pytest

from blkpy.backends.raw import RawDisk
from blkpy.ring import BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY
from blkpy.sim.inprocess import InProcessDevice


def test_a_failed_sync_fails_every_later_flush(tmp_path, monkeypatch):
    path = tmp_path / "d.raw"
    path.write_bytes(bytes(1 << 20))
    disk = RawDisk(str(path))
    disk.flush()
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "x")))
    with pytest.raises(OSError):
        disk.flush()
    monkeypatch.setattr(os, "fdatasync", real)  # the device works again...
    with pytest.raises(OSError, match="an earlier sync failed"):
        disk.flush()  # ...but what it dropped is gone: never report durability again
    disk.close()


@pytest.mark.parametrize("engine", ["sync", "uring"])
def test_the_ring_loop_and_the_engines_honour_a_lost_sync(raw_image, engine):
    dev = InProcessDevice(raw_image, persistent=True, engine=engine)
    try:
        f, g = dev.data_page(0x42)
        flush = dev.request(BLKIF_OP_FLUSH_DISKCACHE, 0, [], rid=5)
        assert dev.status_of(dev.request(BLKIF_OP_WRITE, 0, [(g, 0, 7)])) == [BLKIF_RSP_OKAY]
        assert dev.status_of(flush) == [BLKIF_RSP_OKAY]
        dev.disk.sync_lost[0] = 1  # what a failed fdatasync leaves behind
        assert dev.status_of(flush) == [BLKIF_RSP_ERROR]
        assert dev.status_of(dev.request(BLKIF_OP_WRITE, 0, [(g, 0, 7)])) == [BLKIF_RSP_OKAY]
    finally:
        dev.close()
