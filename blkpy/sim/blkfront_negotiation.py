"""What a Linux xen-blkfront decides during the xenbus handshake, as pure functions.

Nothing here touches xenstore or memory: the caller reads nodes into dicts, these
functions turn them into decisions (which action a backend state calls for, which ring
order to use, which nodes to publish, which features the disk ends up with), and the
caller carries them out. Behaviour follows blkfront as summarised in the xenbus-vbd spec
§3.2–§4: act on InitWait only while Initialising, read disk properties at Connected with
sectors/info/sector-size mandatory, flush-cache winning over barrier, indirect segments
only above 11.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from blkpy.ring import (
    ABIS,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_WRITE_BARRIER,
    MAX_RING_PAGE_ORDER,
    VDISK_READONLY,
)
from blkpy.xenbus import XenbusState

# XenbusState values as plain ints (the frontend compares node values with them).
UNKNOWN = int(XenbusState.UNKNOWN)
INITIALISING = int(XenbusState.INITIALISING)
INIT_WAIT = int(XenbusState.INIT_WAIT)
INITIALISED = int(XenbusState.INITIALISED)
CONNECTED = int(XenbusState.CONNECTED)
CLOSING = int(XenbusState.CLOSING)
CLOSED = int(XenbusState.CLOSED)

PROTOCOLS = tuple(ABIS)



class NegotiationError(Exception):
    """The backend published something blkfront treats as fatal."""


class Action(enum.Enum):
    """What blkfront does when it sees a backend state change."""

    IGNORE = "ignore"
    TALK = "talk"  # publish ring + event channel, go Initialised
    CONNECT = "connect"  # read disk properties, go Connected
    CLOSE = "close"  # backend is going away: go Closed


def on_backend_state(own_state: int, backend_state: int) -> Action:
    """blkback_changed(): the action for ``backend_state`` given our own state."""
    if backend_state == INIT_WAIT:
        # A second InitWait (e.g. a watch firing again) must not re-grant the ring.
        return Action.TALK if own_state == INITIALISING else Action.IGNORE
    if backend_state == CONNECTED:
        # Seen again while Connected: a resize; re-reading the properties is harmless.
        return Action.CONNECT if own_state in (INITIALISED, CONNECTED) else Action.IGNORE
    if backend_state == CLOSED and own_state == CLOSED:
        return Action.IGNORE
    if backend_state in (CLOSING, CLOSED):
        return Action.CLOSE
    return Action.IGNORE


def protocol_name(abi: str) -> str:
    """The `protocol` node value for an ABI given as "x86_64" or "x86_64-abi"."""
    name = abi if abi.endswith("-abi") else f"{abi}-abi"
    if name not in PROTOCOLS:
        raise ValueError(f"unknown blkif ABI {abi!r} (expected one of {', '.join(PROTOCOLS)})")
    return name


def _read_uint(nodes: Mapping[str, str | None], key: str, default: int) -> int:
    """xenbus_read_unsigned(): a missing or unparsable node reads as the default."""
    raw = nodes.get(key)
    if raw is None:
        return default
    try:
        value = int(raw.strip(), 10)
    except ValueError:
        return default
    return value if value >= 0 else default


def choose_ring_order(configured_max: int, backend_nodes: Mapping[str, str | None]) -> int:
    """min(our max_ring_page_order, the backend's max-ring-page-order (default 0))."""
    if not 0 <= configured_max <= MAX_RING_PAGE_ORDER:
        raise ValueError(f"max_ring_page_order must be 0..{MAX_RING_PAGE_ORDER}")
    return min(configured_max, _read_uint(backend_nodes, "max-ring-page-order", 0))


def choose_queues(configured: int, backend_nodes: Mapping[str, str | None]) -> int:
    """min(our queue count, the backend's multi-queue-max-queues (default 1)), at least 1."""
    if configured < 1:
        raise ValueError("a frontend needs at least one queue")
    return max(1, min(configured, _read_uint(backend_nodes, "multi-queue-max-queues", 1)))


def ring_nodes(
    order: int, ring_refs: list[int], event_channel: int, protocol: str, persistent: bool
) -> dict[str, str]:
    """The nodes talk_to_blkback() writes for a single queue."""
    return queue_nodes(order, [(ring_refs, event_channel)], protocol, persistent)


def queue_nodes(
    order: int, queues: list[tuple[list[int], int]], protocol: str, persistent: bool
) -> dict[str, str]:
    """The nodes talk_to_blkback() writes in one transaction before going Initialised, for
    ``queues`` of (ring refs, event channel). One queue keeps its keys at the top level;
    several go under queue-N/ with multi-queue-num-queues, ring-page-order staying shared."""
    if not queues:
        raise ValueError("no queues")
    nodes: dict[str, str] = {}
    if order:
        nodes["ring-page-order"] = str(order)
    if len(queues) > 1:
        nodes["multi-queue-num-queues"] = str(len(queues))
    for q, (refs, port) in enumerate(queues):
        if len(refs) != 1 << order:
            raise ValueError(f"ring order {order} needs {1 << order} refs, got {len(refs)}")
        prefix = f"queue-{q}/" if len(queues) > 1 else ""
        if order == 0:
            nodes[f"{prefix}ring-ref"] = str(refs[0])
        else:
            for i, ref in enumerate(refs):
                nodes[f"{prefix}ring-ref{i}"] = str(ref)
        nodes[f"{prefix}event-channel"] = str(port)
    nodes["protocol"] = protocol
    nodes["feature-persistent"] = "1" if persistent else "0"
    return nodes


def is_ring_node(key: str) -> bool:
    """Whether a frontend node belongs to a published ring (to clear stale ones)."""
    top = key.split("/", 1)[0]
    return (
        top.startswith(("ring-ref", "queue-"))
        or top in ("ring-page-order", "multi-queue-num-queues", "event-channel")
    )


@dataclasses.dataclass(frozen=True)
class DiskInfo:
    """The disk as blkfront sees it after blkfront_connect()."""

    sectors: int  # in 512-byte units, whatever sector-size says
    info: int  # VDISK_* bits
    sector_size: int
    physical_sector_size: int
    flush: bool  # feature-flush-cache
    barrier: bool  # feature-barrier
    discard: bool
    discard_granularity: int
    discard_alignment: int
    discard_secure: bool
    persistent: bool  # both sides agreed
    max_indirect_segments: int  # 0 = no indirect requests

    @property
    def readonly(self) -> bool:
        return bool(self.info & VDISK_READONLY)

    @property
    def size(self) -> int:
        return self.sectors * 512

    @property
    def flush_op(self) -> int | None:
        """The op blkfront uses for a cache flush: flush-cache wins over barrier."""
        if self.flush:
            return BLKIF_OP_FLUSH_DISKCACHE
        if self.barrier:
            return BLKIF_OP_WRITE_BARRIER
        return None

    @property
    def max_segments(self) -> int:
        """Most segments one request may carry."""
        return self.max_indirect_segments or BLKIF_MAX_SEGMENTS_PER_REQUEST


def parse_backend_connected(
    nodes: Mapping[str, str | None], *, persistent: bool, max_indirect_segments: int
) -> DiskInfo:
    """blkfront_connect() + blkfront_gather_backend_features() on the backend's nodes."""
    required = {}
    for key in ("sectors", "info", "sector-size"):
        raw = nodes.get(key)
        try:
            required[key] = int(raw, 10) if raw is not None else None
        except ValueError:
            required[key] = None
        if required[key] is None:
            raise NegotiationError(f"reading backend {key}: missing or not a number ({raw!r})")
    sector_size = required["sector-size"]
    if sector_size < 512 or sector_size & (sector_size - 1):
        raise NegotiationError(f"backend sector-size {sector_size} is not a power of two >= 512")
    physical = _read_uint(nodes, "physical-sector-size", sector_size) or sector_size
    discard = _read_uint(nodes, "feature-discard", 0) == 1
    backend_indirect = _read_uint(nodes, "feature-max-indirect-segments", 0)
    indirect = min(max_indirect_segments, backend_indirect)
    return DiskInfo(
        sectors=required["sectors"],
        info=required["info"],
        sector_size=sector_size,
        physical_sector_size=physical,
        flush=_read_uint(nodes, "feature-flush-cache", 0) == 1,
        barrier=_read_uint(nodes, "feature-barrier", 0) == 1,
        discard=discard,
        # blkfront falls back to the physical sector size for a missing/zero granularity.
        discard_granularity=(_read_uint(nodes, "discard-granularity", 0) or physical) if discard else 0,
        discard_alignment=_read_uint(nodes, "discard-alignment", 0) if discard else 0,
        discard_secure=discard and _read_uint(nodes, "discard-secure", 0) == 1,
        persistent=persistent and _read_uint(nodes, "feature-persistent", 0) == 1,
        max_indirect_segments=indirect if indirect > BLKIF_MAX_SEGMENTS_PER_REQUEST else 0,
    )


# Backend nodes read at Connected (what the caller should fetch before parsing).
CONNECTED_NODES = (
    "sectors",
    "info",
    "sector-size",
    "physical-sector-size",
    "feature-flush-cache",
    "feature-barrier",
    "feature-discard",
    "discard-granularity",
    "discard-alignment",
    "discard-secure",
    "feature-persistent",
    "feature-max-indirect-segments",
)
# Backend nodes read at InitWait.
INIT_WAIT_NODES = ("max-ring-page-order", "multi-queue-max-queues")
