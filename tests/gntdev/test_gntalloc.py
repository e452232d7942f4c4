"""Gntalloc against the fake device: pages granted by this domain, mapped back via gntdev."""

from __future__ import annotations

import errno

import pytest

from blkpy.gntdev import abi
from blkpy.gntdev.gntalloc import Gntalloc
from blkpy.gntdev.linux import LinuxPlatform
from blkpy.platform import GrantError, PlatformError

from .fake_xen import EVTCHN, GNTALLOC, GNTDEV, FakeXen


@pytest.fixture
def xen():
    return FakeXen()


def test_granted_pages_map_back_through_gntdev(xen):
    alloc = Gntalloc(calls=xen)
    pages = alloc.alloc(0, 3, writable=True)
    assert len(set(pages.refs)) == 3 and pages.count == 3
    assert ("ioctl", alloc._fd, 0x00184705) in xen.log
    pages.buffer[4096 : 4096 + 5] = b"hello"
    backend = LinuxPlatform(calls=xen)
    with backend.map_grants(0, pages.refs, writable=True) as m:
        assert bytes(m.buffer[4096 : 4096 + 5]) == b"hello"
        m.buffer[0] = 0x11
        assert pages.buffer[0] == 0x11
    pages.unmap()
    assert xen.allocated == {}
    with pytest.raises(GrantError):
        backend.map_grants(0, pages.refs, writable=False)  # deallocated: grants gone
    backend.close()
    alloc.close()
    alloc.close()


def test_readonly_grants_refuse_writable_maps(xen):
    alloc = Gntalloc(calls=xen)
    pages = alloc.alloc(0, 1, writable=False)
    backend = LinuxPlatform(calls=xen)
    with pytest.raises(GrantError):
        backend.map_grants(0, pages.refs, writable=True)
    backend.map_grants(0, pages.refs, writable=False).unmap()


def test_unmap_notify_and_bad_counts(xen):
    alloc = Gntalloc(calls=xen)
    pages = alloc.alloc(0, 2)
    alloc.set_unmap_notify(pages, 10, abi.UNMAP_NOTIFY_CLEAR_BYTE)
    assert ("notify-on-unmap", pages.index + 10, 1, 0) in xen.log
    with pytest.raises(PlatformError):
        alloc.alloc(0, 0)


def test_missing_gntalloc(xen):
    with pytest.raises(PlatformError, match="xen-gntalloc") as info:
        Gntalloc(calls=FakeXen(devices=(GNTDEV, EVTCHN)))
    assert info.value.errno == errno.ENOENT
    assert GNTALLOC in str(info.value)
