"""Test fixtures' view of the NBD servers (blkpy/sim/nbdserver.py): skipped where they are
not installed (setup.sh installs them, so CI always runs them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from blkpy.sim import nbdserver
from blkpy.sim.nbdserver import NbdServer


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (setup.sh installs them)")


def nbdkit(workdir: Path, *args: str, name: str = "nbdkit") -> NbdServer:
    need("nbdkit")
    return nbdserver.nbdkit(workdir, *args, name=name)


def qemu_nbd(workdir: Path, image: Path, fmt: str = "raw", *args: str,
             name: str = "qemu-nbd") -> NbdServer:
    need("qemu-nbd")
    return nbdserver.qemu_nbd(workdir, image, fmt, *args, name=name)
