"""A self-test of the linux platform on a real Xen host, with no guest needed: this domain
grants pages to itself through gntalloc, maps and copies them back through gntdev, and sends
events to itself over a loopback interdomain channel.

Run as root in dom0: ``python3 -m blkpy.gntdev.selftest`` (prints one JSON object, exit status
0 when every check passed).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import numpy as np

from blkpy.gntdev.gntalloc import Gntalloc, GrantedPages
from blkpy.gntdev.linux import DeviceCalls, LinuxEventChannel, LinuxPlatform
from blkpy.platform import COPY_SEGMENT_DTYPE, GNTST_OKAY, PAGE_SIZE, GrantError, PlatformError

PAGES = 4
EVENT_WAIT_S = 5.0


class SelfTestFailure(Exception):
    """A check saw the host behave differently from what blkpy relies on."""


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise SelfTestFailure(message)


def _wait_event(channel: LinuxEventChannel) -> bool:
    deadline = time.monotonic() + EVENT_WAIT_S
    while time.monotonic() < deadline:
        if channel.ack():
            return True
        time.sleep(0.001)
    return False


def _check_maps(platform: LinuxPlatform, pages: GrantedPages, domid: int) -> None:
    pattern = np.arange(PAGES * PAGE_SIZE, dtype=np.uint32).view(np.uint8)[: PAGES * PAGE_SIZE]
    pages.buffer[:] = pattern.tobytes()
    with platform.map_grants(domid, pages.refs, writable=True) as mapping:
        _expect(bytes(mapping.buffer) == pattern.tobytes(), "mapped pages differ from granted ones")
        mapping.buffer[0] ^= 0xFF
        _expect(pages.buffer[0] == pattern[0] ^ 0xFF, "a write through the mapping was not seen")
    reversed_refs = pages.refs[::-1]
    with platform.map_grants(domid, reversed_refs, writable=False) as mapping:
        _expect(mapping.buffer.readonly, "a read-only mapping is writable")
        _expect(mapping.buffer[(PAGES - 1) * PAGE_SIZE + 1] == pages.buffer[1], "pages out of order")


def _check_bad_ref(platform: LinuxPlatform, domid: int, good_ref: int) -> None:
    try:
        platform.map_grants(domid, [good_ref, 0x7FFFFFFF], writable=False).unmap()
    except GrantError:
        return
    raise SelfTestFailure("a batch with a bad grant ref was mapped")


def _check_copy(platform: LinuxPlatform, pages: GrantedPages, domid: int) -> None:
    if not platform.supports_grant_copy():
        return
    local = np.full(512, 0xA5, dtype=np.uint8)
    back = np.zeros(512, dtype=np.uint8)
    segs = np.zeros(2, dtype=COPY_SEGMENT_DTYPE)
    segs[0] = (local.ctypes.data, pages.refs[1], domid, 1024, 512, 1, 0, 0, 0)
    segs[1] = (back.ctypes.data, pages.refs[1], domid, 1024, 512, 0, 0, 0, 0)
    platform.grant_copy(segs)
    _expect(segs["status"].tolist() == [GNTST_OKAY, GNTST_OKAY], f"copy statuses {segs['status']}")
    copied = bytes(pages.buffer[PAGE_SIZE + 1024 : PAGE_SIZE + 1536])
    _expect(copied == local.tobytes(), "copy to the grant did not land")
    _expect(back.tobytes() == local.tobytes(), "copy from the grant did not land")


def _check_events(platform: LinuxPlatform, domid: int) -> None:
    offered = platform.bind_unbound_port(domid)
    bound = platform.bind_interdomain(domid, offered.local_port)
    try:
        _expect(not offered.ack(), "an event was pending on a fresh port")
        bound.notify()
        _expect(_wait_event(offered), "no event arrived on the offered port")
        offered.notify()
        _expect(_wait_event(bound), "no event arrived on the bound port")
    finally:
        bound.close()
        offered.close()


def run(domid: int = 0, calls: DeviceCalls | None = None) -> dict[str, object]:
    """Run every check as domain ``domid`` (this domain's id); a JSON-able report."""
    results: dict[str, str] = {}
    report: dict[str, object] = {"checks": results}
    try:
        platform = LinuxPlatform(calls=calls)
        allocator = Gntalloc(calls=calls)
        pages = allocator.alloc(domid, PAGES, writable=True)
    except PlatformError as exc:
        report["error"] = str(exc)
        report["ok"] = False
        return report
    checks: list[tuple[str, Callable[[], None]]] = [
        ("map", lambda: _check_maps(platform, pages, domid)),
        ("bad-ref", lambda: _check_bad_ref(platform, domid, pages.refs[0])),
        ("copy", lambda: _check_copy(platform, pages, domid)),
        ("events", lambda: _check_events(platform, domid)),
    ]
    for name, check in checks:
        try:
            check()
            results[name] = "ok"
        except (SelfTestFailure, OSError) as exc:
            results[name] = f"FAILED: {exc}"
    results["copy"] += "" if platform.supports_grant_copy() else " (not supported: skipped)"
    pages.unmap()
    allocator.close()
    report["stats"] = platform.stats.as_dict()
    platform.close()
    report["ok"] = all(r.startswith("ok") for r in results.values())
    return report


def main() -> int:
    report = run()
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
