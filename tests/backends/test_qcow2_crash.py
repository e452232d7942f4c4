"""SIGKILL a writer at random moments: qemu-img check must find no corruption (leaks are
fine) and every write acknowledged before the last completed flush must be there.

This kills the format layer alone (Qcow2Disk in a child); `blkpy fuzz crashes` kills a
whole `blkpy serve` under a guest storm with the same judges (WriteOracle, qemu_check)."""

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
from blkpy.fuzz.crashes import WriteOracle, describe_sectors, qemu_check

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
        check = qemu_check(path)
        assert check.corruptions == 0, check.text
        data = as_raw(path, str(tmp_path / "out.raw"))
        oracle = WriteOracle(backing.read_bytes() + bytes(SIZE))
        # each slot is written once: the first `acked` writes were answered before a
        # completed flush, the rest were in flight or never issued (old or new bytes)
        versions = [oracle.write(slot * SLOT, slot_data(seed, i))
                    for i, slot in enumerate(plan(seed, SIZE))]
        for v in versions[:acked]:
            oracle.complete(v, ok=True)
        oracle.flush_completed(oracle.flush_submitted(), ok=True)
        bad = oracle.mismatches(data[:SIZE], durable_only=True)
        assert not bad, f"trial {trial}: {describe_sectors(bad)} lost or garbled"
        with Qcow2Disk(path, readonly=True) as disk:
            buf = bytearray(SIZE)
            disk.readv(0, [memoryview(buf)])
            assert buf == data
