"""Every blkif operation end to end: simulated blkfront -> ring -> `blkpy serve` subprocess
-> raw image, across ABIs, ring orders, grant modes and engines; hostile raw slots mixed in."""

import numpy as np
import pytest

from blkpy import ring
from blkpy.sim.frontend import Frontend
from blkpy.sim.host import SimHost
from blkpy.sim.toolstack import DiskSpec

DEVID = 51712

VARIANTS = {
    "x86_64 map+persistent": ("x86_64-abi", 0, True, []),
    "x86_32 order2 transient maps": ("x86_32-abi", 2, False, ["--grant-mode", "map"]),
    "x86_64 no-persistent auto copy": ("x86_64-abi", 0, False, []),
    "arm grant-copy": ("arm-abi", 1, True, ["--grant-mode", "copy"]),
    "x86_64 thread engine": ("x86_64-abi", 4, False, ["--engine", "thread"]),
    "x86_32 no persistent offered": ("x86_32-abi", 0, True, ["--no-persistent"]),
    "x86_64 io_uring O_DIRECT": ("x86_64-abi", 1, True, ["--engine", "uring", "--direct-io"]),
}


@pytest.fixture(params=sorted(VARIANTS))
def device(request, raw_image):
    abi, order, persistent, serve_args = VARIANTS[request.param]
    with SimHost(serve_args=serve_args) as host:
        guest = host.create_guest(1)
        spec = DiskSpec(1, DEVID, "xvda", raw_image, protocol=abi)
        backend = host.add_disk(spec)
        fe = Frontend(guest, host.guest_xenstore(1), DEVID, abi=abi, max_ring_page_order=order,
                      max_indirect_segments=128, persistent=persistent)
        fe.connect(timeout=15)
        yield fe
        assert fe.close(timeout=15) == []
        assert host.remove_disk(spec)
        assert backend.wait(10) == 0, backend.log()
        stats = backend.stats()["platform"]
        assert stats["pages_mapped"] == stats["pages_unmapped"]
        assert "Traceback" not in backend.log()


def _pattern(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_every_operation(device):
    fe = device
    small = _pattern(512, 1)
    assert fe.write(3, small).status == 0
    assert bytes(fe.read(3, 512).data) == small
    # 11 segments inline, then 40 pages through an indirect request
    eleven = _pattern(11 * 4096, 2)
    assert fe.write(64, eleven).status == 0
    big = _pattern(40 * 4096, 3)
    assert fe.write(1024, big).status == 0
    assert bytes(fe.read(1024, len(big)).data) == big
    assert bytes(fe.read(64, len(eleven)).data) == eleven
    assert fe.flush().status == 0
    assert fe.barrier(data=None).status == 0
    with_data = _pattern(8192, 4)
    assert fe.barrier(data=with_data, sector=2048).status == 0
    assert bytes(fe.read(2048, 8192).data) == with_data
    assert fe.discard(1024, 80).status == 0
    assert bytes(fe.read(1024, 80 * 512).data) == bytes(80 * 512)
    assert bytes(fe.read(1024 + 80, 4096).data) == big[80 * 512:80 * 512 + 4096]


def test_hostile_slots_are_answered_and_io_continues(device):
    fe = device
    abi = fe.abi
    pages = fe.ring.grant_pages(1)
    gref = pages[0][1]
    slots = np.zeros(5, dtype=abi.request)
    slots["id"] = [100, 101, 102, 103, 104]
    slots["operation"] = [77, ring.BLKIF_OP_READ, ring.BLKIF_OP_READ, ring.BLKIF_OP_WRITE,
                          ring.BLKIF_OP_READ]
    slots["nr_segments"] = [1, 1, 1, 1, 0]
    slots["sector_number"] = [0, 2**64 - 1, 0, 0, 0]
    slots["seg"]["gref"][:, 0] = [gref, gref, 0xFFFF_FFFF, gref, gref]
    slots["seg"]["last_sect"][:, 0] = [7, 7, 7, 9, 7]
    rsp = fe.ring.submit_raw(slots, timeout=10)
    got = dict(zip(rsp["id"].tolist(), rsp["status"].tolist(), strict=True))
    assert got == {100: -2, 101: -1, 102: -1, 103: -1, 104: -1}
    assert fe.ring.release_pages(pages)  # every grant was released before the answers
    data = _pattern(4096, 9)
    assert fe.write(0, data).status == 0
    assert bytes(fe.read(0, 4096).data) == data
