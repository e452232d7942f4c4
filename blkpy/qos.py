"""Per-disk I/O limits (QoS) with QEMU's throttling semantics.

An operator sets them as xenstore nodes under the device's backend directory, at attach
or at any time after (the serve watches them; the guest sees nothing change):

    <backend>/qos/iops-total      requests per second, reads and writes together
    <backend>/qos/iops-read       ... reads only      (not together with iops-total)
    <backend>/qos/iops-write      ... writes only     (not together with iops-total)
    <backend>/qos/bps-total|read|write   bytes per second, likewise
    <backend>/qos/<limit>-max          burst rate allowed above the limit
    <backend>/qos/<limit>-max-length   seconds the burst may last (default 1)

`blkpy qos DOMID DEVID --iops-total 500 ...` writes them. Like QEMU, each limit is a
leaky bucket: without a burst it holds a tenth of a second of the rate, with one
``max * max-length``; flushes and discards are not limited. Admission runs in C
(blkpy/gntdev/ringloop.c, ``blkpy_qos_admit``), shared by the disk's queues.
"""

from __future__ import annotations

import dataclasses

from blkpy.gntdev.native import ffi, lib

NAMES = ("iops-total", "iops-read", "iops-write", "bps-total", "bps-read", "bps-write")
#: every node a limit set may contain
NODES = tuple(n + suffix for n in NAMES for suffix in ("", "-max", "-max-length"))
MAX_VALUE = 2**53  # what a double holds exactly


class QosError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Limit:
    avg: int = 0
    max: int = 0
    max_length: int = 1


@dataclasses.dataclass(frozen=True)
class QosLimits:
    limits: dict[str, Limit] = dataclasses.field(default_factory=dict)

    @property
    def active(self) -> bool:
        return any(lim.avg for lim in self.limits.values())

    def to_nodes(self) -> dict[str, str]:
        nodes: dict[str, str] = {}
        for name, lim in self.limits.items():
            if lim.avg:
                nodes[name] = str(lim.avg)
            if lim.max:
                nodes[f"{name}-max"] = str(lim.max)
            if lim.max_length != 1:
                nodes[f"{name}-max-length"] = str(lim.max_length)
        return nodes


def _number(name: str, value: str) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_VALUE:
        raise QosError(f"qos/{name}: {value[:32]!r} is not a whole number up to 2**53")
    return int(text)


def parse_limits(nodes: dict[str, str]) -> QosLimits:
    """Limits from the ``qos/`` nodes (name -> value); raises QosError, QEMU's rules: a
    total limit excludes its read/write ones, a burst is above its limit, a burst length
    needs a burst."""
    unknown = sorted(set(nodes) - set(NODES))
    if unknown:
        raise QosError(f"qos: unknown setting {unknown[0][:40]!r}")
    limits: dict[str, Limit] = {}
    for name in NAMES:
        avg = _number(name, nodes[name]) if name in nodes else 0
        burst = _number(f"{name}-max", nodes[f"{name}-max"]) if f"{name}-max" in nodes else 0
        length = (_number(f"{name}-max-length", nodes[f"{name}-max-length"])
                  if f"{name}-max-length" in nodes else 1)
        if burst and not avg:
            raise QosError(f"qos/{name}-max needs qos/{name}")
        if burst and burst < avg:
            raise QosError(f"qos/{name}-max ({burst}) is below qos/{name} ({avg})")
        if length < 1 or (length > 1 and not burst):
            raise QosError(f"qos/{name}-max-length must be >= 1 and needs qos/{name}-max")
        if avg:
            limits[name] = Limit(avg, burst, length)
    for kind in ("iops", "bps"):
        if f"{kind}-total" in limits and ({f"{kind}-read", f"{kind}-write"} & set(limits)):
            raise QosError(f"qos/{kind}-total cannot be combined with {kind}-read/-write")
    return QosLimits(limits)


class QosState:
    """The C bucket set of one disk, shared by its queues' loops."""

    def __init__(self, limits: QosLimits | None = None) -> None:
        self.native = ffi.new("struct blkpy_qos *")
        self.limits = QosLimits()
        if limits is not None:
            self.configure(limits)

    @property
    def active(self) -> bool:
        return bool(self.native.active)

    def configure(self, limits: QosLimits) -> None:
        """New limits from now on; a running bucket keeps its level, so changing the
        limit neither grants nor loses a burst. (The loops read the doubles racily; a
        torn read is impossible for aligned doubles on the platforms we build for.)"""
        for k, name in enumerate(NAMES):
            lim = limits.limits.get(name, Limit())
            b = self.native.b[k]
            b.avg, b.max, b.max_length = float(lim.avg), float(lim.max), float(lim.max_length)
            if not lim.avg:
                b.level = b.burst_level = 0.0
        self.native.active = 1 if limits.active else 0
        self.limits = limits

    def admit(self, write: bool, nbytes: int) -> int:
        """0: admitted and charged; else ns to wait before asking again."""
        return int(lib.blkpy_qos_admit(self.native, int(write), nbytes))

    @property
    def delays(self) -> int:
        return int(self.native.delays)
