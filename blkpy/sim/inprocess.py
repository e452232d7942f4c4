"""A guest and a Vbd in one process on the sim platform: the caller plays a frontend that
writes raw request slots (any field values) and reads the responses. The dispatcher's
tests and its cost benchmark use it; there is no xenstore and no second process."""

from __future__ import annotations

import numpy as np

from blkpy import ring
from blkpy.backends import open_disk
from blkpy.engine import make_engine
from blkpy.requests import DiskGeometry
from blkpy.sim.guest import SimGuest
from blkpy.sim.hypervisor import create_sim_dir, remove_sim_dir
from blkpy.sim.platform import SimPlatform
from blkpy.vbd import Vbd

GUEST = 1


class InProcessDevice:
    def __init__(self, image: str, *, abi: str = "x86_64-abi", order: int = 0,
                 readonly: bool = False, persistent: bool = False, grant_mode: str = "map",
                 engine: str = "sync", sector_size: int = 512, discard: bool = True,
                 poll_us: int = 0, fmt: str = "raw", direct: bool = False,
                 start_index: int = 0) -> None:
        self.sim_dir = create_sim_dir()
        self.guest = SimGuest(self.sim_dir, GUEST, memory_pages=4096)
        self.platform = SimPlatform(self.sim_dir, xenstore_path="unused")
        self.abi = ring.ABIS[abi]
        npages = 1 << order
        self.ring_frames = self.guest.alloc_pages(npages)
        refs = [self.guest.grant_access(f, 0) for f in self.ring_frames]
        self.ring_refs = refs
        self.front = ring.FrontRing(self._ring_view(), self.abi, npages)
        if start_index:
            # A ring whose free-running indices start anywhere (they wrap at 2**32):
            # the frontend initialises the header, the backend attaches at rsp_prod.
            header = np.frombuffer(self._ring_view(), dtype="<u4", count=4)
            first, event = start_index & 0xFFFFFFFF, (start_index + 1) & 0xFFFFFFFF
            header[:] = [first, event, first, event]
            self.front = ring.FrontRing(self._ring_view(), self.abi, npages, init=False)
        self.ring_map = self.platform.map_grants(GUEST, refs, writable=True)
        back = ring.BackRing(self.ring_map.buffer, self.abi, npages)
        self.port = self.guest.alloc_unbound_port(0)
        evt = self.platform.bind_interdomain(GUEST, self.port.port)
        options = {"sector_size": sector_size, "direct": direct} if fmt == "raw" else {}
        self.disk = open_disk(image, fmt, readonly=readonly, **options)
        self.geometry = DiskGeometry(
            sectors=self.disk.size >> 9, sector_size=self.disk.sector_size, readonly=readonly,
            discard=discard and self.disk.can_discard,
        )
        self.broken: list[str] = []
        self.vbd = Vbd(self.platform, GUEST, back, evt, self.disk,
                       make_engine(engine, self.disk), self.geometry,
                       persistent=persistent, grant_mode=grant_mode, poll_us=poll_us,
                       on_broken=self.broken.append)

    def _ring_view(self) -> memoryview:
        # A fresh guest hands out consecutive frames, so its ring is one slice of its RAM
        # (ring-ref i must name page i, hence the refs are granted in frame order).
        frames = self.ring_frames
        assert sorted(frames) == list(range(min(frames), min(frames) + len(frames)))
        if frames != sorted(frames):
            raise AssertionError("ring frames must ascend for the in-process view")
        return memoryview(self.guest.memory[frames[0] * 4096:(frames[-1] + 1) * 4096])

    def data_page(self, fill: int | None = None, readonly: bool = False) -> tuple[int, int]:
        frame = self.guest.alloc_pages(1)[0]
        if fill is not None:
            self.guest.page(frame)[:] = bytes([fill]) * 4096
        return frame, self.guest.grant_access(frame, 0, readonly=readonly)

    def request(self, op: int, sector: int, segs: list[tuple[int, int, int]], rid: int = 1,
                nr_segments: int | None = None) -> np.ndarray:
        r = np.zeros(1, dtype=self.abi.request)
        r["operation"] = op
        r["id"] = rid
        r["sector_number"] = sector
        r["nr_segments"] = len(segs) if nr_segments is None else nr_segments
        for k, (gref, first, last) in enumerate(segs):
            r["seg"][0, k] = (gref, first, last)
        return r

    def run(self, reqs: np.ndarray) -> np.ndarray:
        self.front.put_requests(reqs)
        self.front.push_requests()
        self.vbd.kick()
        while self.vbd.engine.in_flight:
            self.vbd.drain()
        return self.front.consume_responses()

    def status_of(self, reqs: np.ndarray) -> list[int]:
        return [int(s) for s in self.run(reqs)["status"]]

    def close(self) -> None:
        self.vbd.close()
        self.ring_map.unmap()
        self.disk.close()
        self.platform.close()
        self.guest.close()
        remove_sim_dir(self.sim_dir)
