"""A serve killed at every point of a request's life, and its successor (`blkpy serve
--resume`) taking the rings over from their journals: the simulated blkfront (which, like
Linux's, treats a duplicate or unknown response as fatal) sees every request answered
exactly once, with the right data, and the guest never sees a state change."""

import random
import time

import numpy as np
import pytest

from blkpy.ring import BLKIF_OP_READ, BLKIF_OP_WRITE
from blkpy.sim import toolstack
from blkpy.sim.frontend import Frontend
from blkpy.sim.host import SimHost
from blkpy.xenbus import XenbusState
from tests.qemu_img import as_raw, needs_qemu, qemu_img

DISK = 8 << 20
SLOTS = 64  # disjoint 64 KiB regions: requests in flight never overlap


def _workload(host, spec, fe, model, image, requests, rng, restarts):
    """Random 4-32 KiB reads and writes at queue depth 16 over every queue of the
    frontend; when the serve dies, start its successor. Returns how many completed."""
    busy: dict[tuple[int, int], int] = {}  # (queue, request id) -> region
    done = 0
    submitted = 0
    deadline = time.monotonic() + 120
    while done < requests:
        assert time.monotonic() < deadline, "the workload stalled"
        while submitted < requests and len(busy) < 16:
            q = rng.randrange(len(fe.rings))
            ring = fe.rings[q]
            if not ring.can_submit():
                break
            region = rng.choice([r for r in range(SLOTS) if r not in busy.values()])
            sector = region * 128 + rng.randrange(0, 64)
            nbytes = rng.choice((4096, 8192, 32768))
            if rng.random() < 0.5:
                data = np.frombuffer(rng.randbytes(nbytes), np.uint8)
                rid = ring.submit(BLKIF_OP_WRITE, sector, data=data, tag=(sector, data))
            else:
                rid = ring.submit(BLKIF_OP_READ, sector, nbytes=nbytes, tag=(sector, None))
            busy[(q, rid)] = region
            submitted += 1
        for q, ring in enumerate(fe.rings):
            ring.push()
            for c in ring.poll(0.05 / len(fe.rings)):
                done += _check(c, model)
                del busy[(q, c.id)]
        current = host.backends[-1]
        if current.proc.poll() is not None:
            assert current.proc.returncode == -9, current.log()[-2000:]
            assert host.backend_state(spec) == XenbusState.CONNECTED
            restarts.append(host.start_backend(spec, ["--resume"]))
    return done


def _check(c, model: bytearray) -> int:
    assert c.status == 0, f"request {c.id} failed: {c.status}"
    sector, data = c.tag
    off = sector * 512
    if data is not None:
        model[off:off + len(data)] = data.tobytes()
    else:
        assert c.data.tobytes() == bytes(model[off:off + c.nbytes]), "bad read"
    return 1


@pytest.mark.parametrize("point", ["consume", "submit", "io-done", "produced", "pushed"])
@pytest.mark.parametrize(("serve_args", "queues"),
                         [([], 1), (["--grant-mode", "copy"], 1), (["--engine", "uring"], 1),
                          ([], 2)], ids=["persistent", "copy", "uring", "two-queues"])
def test_a_killed_serve_is_taken_over_without_the_guest_noticing(tmp_path, point, serve_args,
                                                                 queues):
    rng = random.Random(hash((point, tuple(serve_args), queues)) & 0xFFFF)
    image = tmp_path / "disk.img"
    content = rng.randbytes(DISK)
    image.write_bytes(content)
    model = bytearray(content)
    with SimHost(serve_args) as host:
        guest = host.create_guest(1, memory_pages=4096)
        spec = toolstack.DiskSpec(1, 51712, "xvda", str(image))
        host.add_disk(spec, start_backend=False)
        # Killed at a random pass of the point (the reference path passes once a batch).
        first = host.start_backend(spec, env={"BLKPY_CRASH_AT": f"{point}:{rng.randrange(3, 25)}"})
        fe = Frontend(guest, host.guest_xenstore(1), 51712, num_queues=queues)
        fe.connect(timeout=15)
        assert len(fe.rings) == queues
        restarts: list = []
        done = _workload(host, spec, fe, model, image, 600, rng, restarts)
        assert done == 600
        assert first.proc.returncode == -9  # it did die where it was told
        assert restarts, "no successor ran"
        assert not fe.protocol_errors
        assert fe.state == XenbusState.CONNECTED
        fe.close()
        host.remove_disk(spec)
        host.backends[-1].wait(10)
    assert image.read_bytes() == bytes(model)


@needs_qemu
@pytest.mark.parametrize("point", ["io-done", "pushed"])
def test_a_killed_qcow2_serve_keeps_every_acknowledged_write(tmp_path, point):
    """An overlay on a backing file: the guest's writes allocate clusters (copying the
    rest of each from the backing file). The dead serve's cluster mappings were only in
    its memory until the guest's next flush; its successor must still return every
    write the guest was told had completed (the guest never flushes here)."""
    rng = random.Random(hash(point) & 0xFFFF)
    backing = tmp_path / "base.raw"
    content = rng.randbytes(DISK)
    backing.write_bytes(content)
    image = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw", str(image))
    model = bytearray(content)
    with SimHost([]) as host:
        guest = host.create_guest(1, memory_pages=4096)
        spec = toolstack.DiskSpec(1, 51712, "xvda", f"qcow2:{image}")
        host.add_disk(spec, start_backend=False)
        first = host.start_backend(spec, env={"BLKPY_CRASH_AT": f"{point}:{rng.randrange(3, 25)}"})
        fe = Frontend(guest, host.guest_xenstore(1), 51712)
        fe.connect(timeout=15)
        restarts: list = []
        assert _workload(host, spec, fe, model, image, 600, rng, restarts) == 600
        assert first.proc.returncode == -9
        assert restarts, "no successor ran"
        assert not fe.protocol_errors
        fe.close()
        host.remove_disk(spec)
        host.backends[-1].wait(10)
    assert as_raw(str(image), str(tmp_path / "out.raw")) == bytes(model)
