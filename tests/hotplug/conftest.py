"""Fixtures: a simulated xenstored, a dom0 client, and a backend directory as libxl lays it out."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from xenstored_fixture import temporary_xenstored

from blkpy.sim.toolstack import DiskSpec, disk_nodes
from blkpy.xenstore.client import XenstoreClient

BLKPY = [sys.executable, "-m", "blkpy"]


@pytest.fixture
def xenstored():
    with temporary_xenstored("blkpy-hp-") as path:
        yield path


@pytest.fixture
def xs(xenstored):
    with XenstoreClient.connect(xenstored) as client:
        yield client


def add_disk(xs: XenstoreClient, target: str, *, domid: int = 5, devid: int = 51712,
             script: str = "/etc/xen/scripts/block-blkpy", readonly: bool = False) -> str:
    """Write a vbd's backend and frontend dirs like libxl; return the relative backend path."""
    spec = DiskSpec(frontend_domid=domid, devid=devid, vdev="xvda", target=target,
                    readonly=readonly, script=script)

    def write(tx: int) -> None:
        for d in disk_nodes(spec):
            for name, value in d.nodes.items():
                xs.write(f"{d.path}/{name}", value, tx)
            xs.set_perms(d.path, d.perms, tx)

    xs.run_transaction(write)
    return f"backend/vbd/{domid}/{devid}"


def run_blkpy(args: list[str], xenstored: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BLKPY, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "XENSTORED_PATH": xenstored, **env})
