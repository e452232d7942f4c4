"""SIGKILL a writer at random moments: qemu-img check must find no corruption (leaks are
fine) and every write acknowledged before the last completed flush must be there."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from qemu_img import as_raw, needs_qemu, qemu_img

from blkpy.backends.qcow2 import Qcow2Disk

from .qcow2_crash_child import SLOT, plan, slot_data

pytestmark = needs_qemu
SIZE = 2 << 20
CHILD = os.path.join(os.path.dirname(__file__), "qcow2_crash_child.py")


def _run_and_kill(path: str, seed: int, cache: int, rnd: random.Random) -> int:
    """Start the writer, kill it after a random number of flushes plus a random delay;
    returns how many writes had been acknowledged by a completed flush."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, CHILD, path, str(seed), str(cache)],
                             stdout=subprocess.PIPE, text=True, env=env)
    acked = 0
    kill_after = rnd.randint(0, 12)
    assert child.stdout is not None
    try:
        for line in child.stdout:
            if line.startswith("F "):
                acked = int(line.split()[1])
                kill_after -= 1
                if kill_after <= 0:
                    time.sleep(rnd.random() * 0.02)  # land anywhere in the next writes
                    break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    return acked


@pytest.mark.parametrize("cluster_size,with_backing", [(512, True), (65536, True),
                                                       (65536, False)])
def test_sigkill_keeps_flushed_writes_and_metadata(tmp_path, cluster_size, with_backing):
    rnd = random.Random(cluster_size + with_backing)
    backing = tmp_path / "base.raw"
    backing.write_bytes(random.Random(3).randbytes(SIZE * 3 // 4) if with_backing else b"")
    for trial in range(8):
        path = str(tmp_path / f"img{trial}.qcow2")
        args = ["-b", str(backing), "-F", "raw"] if with_backing else []
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", *args,
                 path, str(SIZE))
        seed = rnd.randrange(1 << 30)
        acked = _run_and_kill(path, seed, rnd.choice([4096, 1 << 20]), rnd)
        r = qemu_img("check", path, check=False)
        assert r.returncode in (0, 3), r.stdout  # 3 = leaked clusters only
        data = as_raw(path, str(tmp_path / "out.raw"))
        old = backing.read_bytes() + bytes(SIZE)
        for i, slot in enumerate(plan(seed, SIZE)):
            off = slot * SLOT
            new = slot_data(seed, i)
            got = data[off:off + SLOT]
            if i < acked:
                assert got == new, f"acknowledged write {i} lost (trial {trial})"
            else:  # in flight or never issued: each sector old or new, nothing else
                for s in range(0, SLOT, 512):
                    assert got[s:s + 512] in (new[s:s + 512], old[off + s:off + s + 512])
        with Qcow2Disk(path, readonly=True) as disk:
            buf = bytearray(SIZE)
            disk.readv(0, [memoryview(buf)])
            assert buf == data
