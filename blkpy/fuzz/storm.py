"""The event-storm attack: a guest that notifies its backend in a tight loop with nothing
on the ring. Every wake-up finds no work; the backend must keep its CPU bounded (Linux's
backends get this from the late-EOI accounting of spurious events) and still serve the
guest's real requests afterwards."""

from __future__ import annotations

import os
import tempfile
import time

from blkpy.fuzz import FindingLog

#: the backend's share of a core a storm may cost, in percent
STORM_CPU_CAP = 25.0


def event_storm(seed: int, findings: FindingLog, seconds: float = 2.0) -> dict[str, float]:
    """Storm a real `blkpy serve` on the simulated host; returns its figures."""
    from blkpy.bench.benchmark import GUEST_DOMID, _process_cpu_seconds, served_disk
    from blkpy.sim.host import SimHost

    fd, image = tempfile.mkstemp(prefix="blkpy-storm-", suffix=".img")
    os.ftruncate(fd, 16 << 20)
    os.close(fd)
    try:
        with SimHost() as host:
            guest = host.create_guest(GUEST_DOMID, memory_pages=4096)
            with served_disk(host, guest, "raw", image, ring_order=0) as served:
                pid = served.backend.proc.pid
                port = served.frontend.ring.port
                cpu0, t0 = _process_cpu_seconds(pid), time.monotonic()
                sent = 0
                while time.monotonic() - t0 < seconds:
                    for _ in range(500):
                        port.notify()
                    sent += 500
                wall = time.monotonic() - t0
                cpu = (_process_cpu_seconds(pid) - cpu0) / wall * 100
                done = served.frontend.read(0, 4096, timeout=5.0)
                if done.status != 0:
                    findings.add("event storm", "the guest's read after the storm failed")
    finally:
        os.unlink(image)
    if cpu > STORM_CPU_CAP:
        findings.add("event storm", f"{sent / wall:.0f} notifies/s cost the backend "
                     f"{cpu:.0f}% of a core (cap {STORM_CPU_CAP:g}%)", kind="storm cpu")
    return {"storm notifies/s": round(sent / wall), "storm backend CPU %": round(cpu, 1)}
