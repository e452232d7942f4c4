"""The QoS rows of `blkpy bench`: a disk limited to QOS_LIMIT_IOPS keeps within 5% of its
limit while an unlimited neighbour served on the same host keeps its throughput.

Both disks belong to one simulated guest and are served by two `blkpy serve` processes;
the limit is set as libxl-time xenstore nodes (<backend>/qos/iops-total), before the
guest connects. The neighbour is measured alone first, then both run at once."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from blkpy import ring as blkif
from blkpy.sim import toolstack
from blkpy.sim.frontend import Frontend
from blkpy.sim.host import SimHost
from blkpy.sim.load_generator import run_load

#: the limited disk's IOPS limit: far below what either disk does unlimited, so the
#: limit, not the machine, decides its rate
QOS_LIMIT_IOPS = 5000
_DISKS = ((51712, "xvda"), (51728, "xvdb"))


@dataclasses.dataclass
class QosFigures:
    limit: float
    limited: float  # IOPS of the limited disk while both run
    neighbour_alone: float
    neighbour_shared: float  # IOPS of the unlimited disk while the limited one runs
    errors: int = 0

    @property
    def deviation(self) -> float:
        """|limited / limit - 1|: the row's target is <= 0.05."""
        return abs(self.limited / self.limit - 1)

    @property
    def neighbour_ratio(self) -> float:
        return self.neighbour_shared / self.neighbour_alone if self.neighbour_alone else 0.0


@contextlib.contextmanager
def _disk(host: SimHost, guest: object, devid: int, vdev: str, image: Path,
          limit: int | None) -> Iterator[Frontend]:
    spec = toolstack.DiskSpec(1, devid, vdev, str(image))
    host.add_disk(spec, start_backend=False)
    if limit:
        assert host.xs is not None
        host.xs.write(f"{spec.backend_path}/qos/iops-total", str(limit))
    host.start_backend(spec)
    fe = Frontend(guest, host.guest_xenstore(1), devid, max_indirect_segments=256)  # type: ignore[arg-type]
    try:
        fe.connect(timeout=15)
        yield fe
        fe.close(timeout=10)
    finally:
        host.remove_disk(spec, timeout=10)


def measure_qos(files: tuple[Path, Path], seconds: float, serve_args: list[str],
                guest_poll_us: int, say: Callable[[str], None]) -> QosFigures:
    def load(fe: Frontend, out: list, length: float = seconds) -> None:  # noqa: ANN001
        out.append(run_load(fe, op=blkif.BLKIF_OP_READ, nbytes=4096, depth=32,
                            seconds=length, random=True, poll_us=guest_poll_us,
                            latency=False))

    with SimHost(serve_args=serve_args) as host:
        guest = host.create_guest(1, memory_pages=16384)
        (dev_a, vdev_a), (dev_b, vdev_b) = _DISKS
        with _disk(host, guest, dev_a, vdev_a, files[0], QOS_LIMIT_IOPS) as limited, \
                _disk(host, guest, dev_b, vdev_b, files[1], None) as neighbour:
            for fe in (limited, neighbour):  # grants made persistent, polling adapted
                load(fe, [], min(1.0, seconds))
            say(f"qos: the unlimited disk alone for {seconds:g} s")
            alone: list = []
            load(neighbour, alone)
            say(f"qos: both at once, one limited to {QOS_LIMIT_IOPS} IOPS")
            a: list = []
            b: list = []
            thread = threading.Thread(target=load, args=(limited, a))
            thread.start()
            load(neighbour, b)
            thread.join()
    return QosFigures(QOS_LIMIT_IOPS, a[0].iops, alone[0].iops, b[0].iops,
                      a[0].errors + b[0].errors + alone[0].errors)
