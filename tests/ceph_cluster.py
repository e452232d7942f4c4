"""The tests' view of the one-node Ceph cluster (blkpy/sim/ceph.py): one per test session,
skipped with a reason where Ceph's packages are missing (setup.sh installs them, so CI
runs these tests), and images that each test creates and removes."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
from collections.abc import Iterator

import pytest

from blkpy.sim.ceph import POOL, CephUnavailable, MicroCeph

#: the whole start (monitor, OSD, pool, first write) and stop are bounded by this
START_TIMEOUT_S = 90.0
_names = itertools.count()


@contextlib.contextmanager
def session_cluster() -> Iterator[MicroCeph]:
    try:
        cluster = MicroCeph(memstore_bytes=1 << 30, timeout=START_TIMEOUT_S)
    except CephUnavailable as exc:
        pytest.skip(str(exc))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def rbd_image(ceph: MicroCeph, size: str = "64M", *features: str) -> str:
    """A new empty image; returns its POOL/NAME."""
    name = f"{POOL}/t{os.getpid()}-{next(_names)}"
    extra = [a for f in features for a in ("--image-feature", f)]
    ceph.rbd("create", "--size", size, *extra, name)
    return name


def remove_image(ceph: MicroCeph, name: str) -> None:
    """Remove an image and its snapshots (memstore keeps every byte in RAM)."""
    for args in (("snap", "purge", "--no-progress", name), ("rm", "--no-progress", name)):
        with contextlib.suppress(subprocess.CalledProcessError):
            ceph.rbd(*args)


def export(ceph: MicroCeph, spec: str) -> bytes:
    """The image's (or snapshot's) bytes as Ceph itself reads them."""
    return ceph.run("rbd", "export", "--no-progress", spec, "-", timeout=120).stdout
