"""`blkpy fuzz handshake`: hostile and broken frontends against the backend's xenbus handshake.

Each case is one frontend (a simulated Linux blkfront, ``blkpy.sim``) meeting a fresh backend
of one disk on a simulated host: it publishes its ring nodes (ring-ref / ring-page-order /
event-channel / protocol / multi-queue nodes), possibly mutated (missing, huge, negative,
non-numeric, duplicated across queues, naming grants or ports it never offered, changed after
Initialised), walks its state node (flapping, garbage), or vanishes mid-handshake (directory
removed, grants ended, domain destroyed, the toolstack forcing the removal). A share of the
cases are valid handshakes that must connect and carry I/O on every queue.

The judge is :func:`judge`: a plain reading of the node catalogue (xenbus-vbd spec §3.2, §4)
that shares no parsing with ``blkpy.serve``. After every step the backend's state node, the
guest's grant table (which refs are mapped) and its event channels (which ports are bound)
must agree with it; after every case the device is closed and nothing may be left: no grant
mapped, no port bound, no fd, no thread, no exception and no unthrottled log flood.

Most cases drive the real control plane (``DeviceServer``: its state machine, connect and
disconnect code) in this process, one ``step()`` per watch event, against the simulated
xenstored and hypervisor, which makes them cheap and exactly reproducible; one case in
``PROCESS_EVERY`` runs the same script against a real ``blkpy serve`` subprocess (SimHost) to
cover the process: it must exit 0 once the toolstack removes the device, with no traceback in
its log and balanced grant counters. In process, a tripwire on the backend's xenstore
connection also lets the frontend change or vanish between two of the backend's reads.

Each case draws from its own generator (seed, index); the guest's grant refs and ports carry
over from case to case, so a finding (which names its case) is reproduced by running the same
``--seed`` and ``--scale`` again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import random
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from blkpy import ring as blkif
from blkpy.fuzz import CampaignResult, FindingLog, Progress
from blkpy.gntdev.abi import GTF_READING, GTF_WRITING
from blkpy.serve import DeviceServer, ServeOptions
from blkpy.sim import blkfront_negotiation as neg
from blkpy.sim import toolstack
from blkpy.sim.blkfront_ring import BlkfrontRing
from blkpy.sim.guest import GuestPort, SimGuest
from blkpy.sim.host import SimHost
from blkpy.sim.hypervisor import ECS_FREE, ECS_INTERDOMAIN, Domain
from blkpy.sim.platform import SimPlatform
from blkpy.xenstore.client import XenstoreClient, XenstoreError

NAME = "handshake"
CASES_PER_SCALE = 100  # scale 1 (CI) runs 100 handshakes, --full 10^4
PROCESS_EVERY = 50  # one case in this many goes through a `blkpy serve` subprocess
GUEST = 1
DEVID = 51712
MAX_QUEUES = 4  # what the backend offers (fixed, so a seed means the same on every machine)
MAX_ORDER = blkif.MAX_RING_PAGE_ORDER
IMAGE_BYTES = 1 << 20
OPTIONS = ServeOptions(max_queues=MAX_QUEUES, max_ring_page_order=MAX_ORDER)
SERVE_ARGS = ["--max-queues", str(MAX_QUEUES), "--max-ring-page-order", str(MAX_ORDER)]
# Log lines one case may cause at most: two RateLimitedLog bursts (the device's and the
# data path's) and the few lines a device logs once (removed, suppressed counts).
LOG_LINES_MAX = 24

# XenbusState numbers as the spec writes them (judge and script only speak these).
UNKNOWN, INITIALISING, INIT_WAIT, INITIALISED, CONNECTED, CLOSING, CLOSED = range(7)
ABI_NAMES = ("x86_32-abi", "x86_64-abi", "arm-abi")
DEFAULT_ABI = "x86_32-abi"  # a missing protocol node (README design notes, Linux blkback)


# ---- the judge --------------------------------------------------------------------------------

_DECIMAL = re.compile(r"[0-9]{1,10}")
_PADDED = re.compile(r"[ \t\n]*\+?[0-9]{1,10}[ \t\n]*")


def _number(raw: str | None) -> tuple[int | None, bool]:
    """(value, exact) of a decimal node: exact for plain ASCII digits; a value with blanks or
    a plus sign around it is 'not exact' (a backend may read it as scanf does, or refuse it);
    None for anything else (missing, negative, non-ASCII, hex, more than 32 bits)."""
    if raw is None:
        return None, True
    if _DECIMAL.fullmatch(raw) and int(raw) < 2**32:
        return int(raw), True
    if _PADDED.fullmatch(raw):
        value = int(raw.strip(" \t\n").lstrip("+"))
        return (value, False) if value < 2**32 else (None, True)
    return None, True


@dataclasses.dataclass(frozen=True)
class Offered:
    """What the frontend really offered the backend domain: its ring grants (writable, not
    ended), and the unbound event-channel ports it allocated for the backend."""

    refs: frozenset[int]
    ports: frozenset[int]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """``connect``: True the backend must connect with ``queues`` ((refs, port) per queue)
    and ``abi``; False it must refuse; None either (an inexact spelling), but if it connects
    it must be with these values."""

    connect: bool | None
    why: str
    abi: str = DEFAULT_ABI
    queues: tuple[tuple[tuple[int, ...], int], ...] = ()

    @property
    def refs(self) -> set[int]:
        return {r for refs, _ in self.queues for r in refs}

    @property
    def ports(self) -> set[int]:
        return {p for _, p in self.queues}


def judge(nodes: Mapping[str, str], offered: Offered) -> Verdict:
    """Whether the frontend directory ``nodes`` (name relative to the directory -> value)
    describes a usable ring set (xenbus-vbd spec §3.2) for a backend advertising MAX_QUEUES
    queues and ring order MAX_ORDER."""
    exact = True

    def number(name: str) -> int | None:
        nonlocal exact
        value, is_exact = _number(nodes.get(name))
        exact = exact and is_exact
        return value

    def refuse(why: str) -> Verdict:
        return Verdict(False, why)

    protocol = nodes.get("protocol")
    if protocol in (None, ""):
        abi = DEFAULT_ABI
    elif protocol in ABI_NAMES:
        abi = protocol
    elif protocol.strip(" \t\n") in ABI_NAMES:
        abi, exact = protocol.strip(" \t\n"), False
    else:
        return refuse(f"protocol {protocol[:20]!r}")
    nqueues = 1
    if "multi-queue-num-queues" in nodes:
        nq = number("multi-queue-num-queues")
        if nq is None or not 1 <= nq <= MAX_QUEUES:
            return refuse("multi-queue-num-queues")
        nqueues = nq
    order = None
    if "ring-page-order" in nodes:
        order = number("ring-page-order")
        if order is None or order > MAX_ORDER:
            return refuse("ring-page-order")
    queues = []
    for q in range(nqueues):
        prefix = "" if nqueues == 1 else f"queue-{q}/"
        if order is None or (order == 0 and f"{prefix}ring-ref0" not in nodes):
            names = [f"{prefix}ring-ref"]  # one page: either spelling
        else:
            names = [f"{prefix}ring-ref{i}" for i in range(1 << order)]
        refs = []
        for name in names:
            ref = number(name)
            if ref is None or ref not in offered.refs:
                return refuse(f"{name} not a live grant")
            refs.append(ref)
        port = number(f"{prefix}event-channel")
        if port is None or port not in offered.ports:
            return refuse(f"{prefix}event-channel not an offered port")
        queues.append((tuple(refs), port))
    all_refs = [r for refs, _ in queues for r in refs]
    if len(set(all_refs)) != len(all_refs):
        return refuse("a ring grant used twice")
    if len({p for _, p in queues}) != len(queues):
        return refuse("an event channel used twice")
    return Verdict(True if exact else None, "valid" if exact else "inexact spelling", abi,
                   tuple(queues))


# ---- the frontend -------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """What a well-behaved frontend would publish (before mutations)."""

    abi: str
    write_protocol: bool
    order: int
    queues: int
    persistent: bool
    order_node_at_zero: bool  # write ring-page-order=0 / ring-ref0 for a one-page ring


class Front:
    """The guest's side of one case: rings (reusing the simulated blkfront's), the nodes it
    publishes, and spare grants and ports it uses to lie with."""

    def __init__(self, world: World, plan: Plan) -> None:
        self.world = world
        self.plan = plan
        self.xs = world.gxs
        self.path = f"/local/domain/{GUEST}/device/vbd/{DEVID}"
        self.rings: list[BlkfrontRing] = []
        self.spare_grants: list[tuple[int, int]] = []  # (frame, ref) still granted
        self.spare_ports: list[GuestPort] = []
        self.offered_ports: set[int] = set()  # spare ports offered to the backend domain
        self.nodes: dict[str, str] = {}

    @property
    def guest(self) -> SimGuest:
        # never kept: a destroyed guest's memory must go with its last ring
        return self.world.guest

    def build_rings(self) -> list[str]:
        """Fresh rings (the old ones' grants ended); returns grants the backend still held."""
        errors = self.drop_rings()
        abi = blkif.ABIS[self.plan.abi]
        self.rings = [BlkfrontRing(self.guest, 0, abi, self.plan.order, handle=DEVID)
                      for _ in range(self.plan.queues)]
        nodes = neg.queue_nodes(self.plan.order,
                                [(r.ring_refs, r.event_channel) for r in self.rings],
                                self.plan.abi, self.plan.persistent)
        if not self.plan.write_protocol:
            del nodes["protocol"]
        if self.plan.order == 0 and self.plan.order_node_at_zero:
            nodes["ring-page-order"] = "0"
            for q in range(self.plan.queues):
                prefix = "" if self.plan.queues == 1 else f"queue-{q}/"
                nodes[f"{prefix}ring-ref0"] = nodes.pop(f"{prefix}ring-ref")
        self.nodes = nodes
        return errors

    def drop_rings(self) -> list[str]:
        errors = []
        for r in self.rings:
            errors += r.close()
        self.rings = []
        return errors

    def offered(self) -> Offered:
        """The ring grants and ports (spare grants are never writable grants to us)."""
        return Offered(frozenset(ref for r in self.rings for ref in r.ring_refs),
                       frozenset({r.event_channel for r in self.rings} | self.offered_ports))

    def spare_grant(self, domid: int = 0, readonly: bool = False) -> int:
        frame = self.guest.alloc_pages(1)[0]
        ref = self.guest.grant_access(frame, domid, readonly=readonly)
        self.spare_grants.append((frame, ref))
        return ref

    def stale_ref(self) -> int:
        """A ref that was granted and has been ended (Linux reuses such refs)."""
        frame = self.guest.alloc_pages(1)[0]
        ref = self.guest.grant_access(frame, 0)
        self.guest.end_access(ref)
        self.guest.free_pages([frame])
        return ref

    def spare_port(self, remote: int) -> int:
        port = self.guest.alloc_unbound_port(remote)
        self.spare_ports.append(port)
        if remote == 0:
            self.offered_ports.add(port.port)
        return port.port

    def publish(self, nodes: Mapping[str, str | None], in_transaction: bool = True) -> None:
        """Write (None: remove) nodes, in one transaction as blkfront does, or one by one."""
        def write(tx: int) -> None:
            for name, value in nodes.items():
                if value is None:
                    with contextlib.suppress(XenstoreError):  # its parent went first
                        self.xs.rm(f"{self.path}/{name}", tx)
                else:
                    # values are bytes on the wire: keep a non-UTF-8 byte as it is
                    self.xs.write(f"{self.path}/{name}",
                                  value.encode("utf-8", "surrogateescape"), tx)
        if in_transaction:
            self.xs.run_transaction(write)
        else:
            write(0)
        for name, value in nodes.items():
            if value is None:
                self.nodes.pop(name, None)
            else:
                self.nodes[name] = value

    def set_state(self, state: int | str | None) -> None:
        if state is None:
            self.xs.rm(f"{self.path}/state")
        else:
            self.xs.write(f"{self.path}/state", str(state))

    def release_spares(self) -> list[str]:
        """End the spare grants (the backend must not hold any) and close spare ports."""
        errors = []
        for frame, ref in self.spare_grants:
            if self.guest.end_access(ref):
                self.guest.free_pages([frame])
            else:
                errors.append(f"spare grant {ref} still mapped by the backend")
        self.spare_grants = []
        for port in self.spare_ports:
            port.close()
        self.spare_ports = []
        self.offered_ports = set()
        return errors

    def io(self, info_nodes: Mapping[str, str | None], tag: int) -> str | None:
        """Write then read back one page on every queue; a problem as text, else None."""
        try:
            info = neg.parse_backend_connected(info_nodes, persistent=self.plan.persistent,
                                               max_indirect_segments=32)
        except neg.NegotiationError as exc:
            return f"backend's Connected nodes unusable: {exc}"
        for q, r in enumerate(self.rings):
            r.attach(info)
            data = bytes([(tag + q) & 0xFF or 1]) * 4096
            sector = (q * 8 + tag * 32) % (IMAGE_BYTES // 512 - 8)
            try:
                r.submit(blkif.BLKIF_OP_WRITE, sector, data=data)
                r.push()
                (done,) = r.wait_all(10.0)
                r.submit(blkif.BLKIF_OP_READ, sector, nbytes=4096)
                r.push()
                (back,) = r.wait_all(10.0)
            except Exception as exc:  # ProtocolError, RingBusy: the backend misbehaved
                return f"queue {q}: I/O failed: {exc}"
            if done.status != 0 or back.status != 0 or bytes(back.data) != data:
                return f"queue {q}: I/O status {done.status}/{back.status} or data mismatch"
        return None


# ---- the backend, in process or as a subprocess ---------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Tripwire:
    """The backend's xenstore connection with a trap: ``arm(n, action)`` runs ``action``
    right after the backend's n-th read from now, i.e. between two of its reads (the
    frontend changing or vanishing while the backend is reading its nodes)."""

    def __init__(self, xs: XenstoreClient) -> None:
        self._xs = xs
        self._left = 0
        self._action: Callable[[], None] | None = None

    def arm(self, reads: int, action: Callable[[], None]) -> None:
        self._left, self._action = reads, action

    def fire(self) -> bool:
        """Run the action now if it has not run; False if it had."""
        action, self._action = self._action, None
        if action is None:
            return False
        action()
        return True

    def read_str(self, path: str, default: str | None = None, tx: int = 0) -> str | None:
        value = self._xs.read_str(path, default, tx)
        if self._action is not None:
            self._left -= 1
            if self._left <= 0:
                self.fire()
        return value

    def read_many(self, paths: list[str], tx: int = 0) -> list[str | None]:
        # one read at a time, so that the action can land between any two of them: the
        # real client's pipelined reads may have another client's writes between them too
        return [self.read_str(path, None, tx) for path in paths]

    def __getattr__(self, name: str) -> object:
        return getattr(self._xs, name)


class InProcessBackend:
    """`DeviceServer` driven directly: ``step`` is one watch event."""

    subprocess = False

    def __init__(self, world: World) -> None:
        self.world = world
        self.platform = SimPlatform(world.host.sim_dir, world.host.socket)
        self.xs = XenstoreClient.connect(world.host.socket)
        self.tripwire = Tripwire(self.xs)
        self.server = DeviceServer(self.platform, self.tripwire,  # type: ignore[arg-type]
                                   world.spec.backend_path, OPTIONS)
        self.crash: str | None = None

    def between_reads(self, action: Callable[[], None], reads: int) -> None:
        """Step with ``action`` run right after the backend's ``reads``-th read (or after
        the step if it reads less)."""
        self.tripwire.arm(reads, action)
        self.step()
        self.tripwire.fire()

    def _guard(self, fn: Callable[[], None]) -> None:
        if self.crash is not None:
            return
        try:
            fn()
        except Exception:  # what would be a traceback in `blkpy serve`'s log
            self.crash = traceback.format_exc(limit=-3).strip().replace("\n", " | ")

    def start(self) -> None:
        self._guard(self.server.start)

    def step(self, expect: set[int] | None = None) -> None:
        """One watch event (``expect`` is for a process, which must be waited for)."""
        self.xs.events()  # what woke us; the step re-reads everything anyway
        self._guard(self.server.step)

    @property
    def finished(self) -> bool:
        return self.server.machine.finished

    def close(self) -> list[str]:
        problems = []
        self._guard(self.server._teardown)
        self.xs.close()
        self.platform.close()
        stats = self.platform.stats
        if stats.pages_mapped != stats.pages_unmapped:
            problems.append(f"leak: {stats.pages_mapped} pages mapped, "
                            f"{stats.pages_unmapped} unmapped")
        return problems


class ProcessBackend:
    """A real `blkpy serve` subprocess: ``step`` waits until it has acted."""

    subprocess = True
    SETTLE_S = 0.05
    WAIT_S = 10.0

    def __init__(self, world: World) -> None:
        self.world = world
        self.proc = world.host.start_backend(world.spec)
        self.crash: str | None = None

    def start(self) -> None:
        self.step({INIT_WAIT})

    def step(self, expect: set[int] | None = None) -> None:
        """Wait until the backend's state is one of ``expect`` (or it exited); without an
        expectation, until its state has not changed for SETTLE_S."""
        deadline = time.monotonic() + self.WAIT_S
        last, since = self.world.backend_state_raw(), time.monotonic()
        while time.monotonic() < deadline and self.proc.proc.poll() is None:
            time.sleep(0.005)
            now = self.world.backend_state_raw()
            if expect is not None and _state(now) in expect:
                return
            if now != last:
                last, since = now, time.monotonic()
            elif expect is None and time.monotonic() - since >= self.SETTLE_S:
                return

    @property
    def finished(self) -> bool:
        """Exited; a Closed backend may be on its way out (it unregisters after Closed)."""
        if self.world.removed:
            timeout = self.WAIT_S
        else:
            timeout = 0.5 if _state(self.world.backend_state_raw()) == CLOSED else 0.0
        return self.proc.wait(timeout) is not None

    def between_reads(self, action: Callable[[], None], reads: int) -> None:
        """A process cannot be stopped between two reads: the action races its step."""
        action()
        self.step()

    def log_tail(self) -> str:
        return self.proc.log()[-800:].replace("\n", " | ")

    def close(self) -> list[str]:
        problems = []
        if self.proc.wait(self.WAIT_S) is None:
            problems.append("serve did not exit after the device was removed")
        status = self.proc.stop()
        if status != 0:
            problems.append(f"serve exited with status {status}")
        log = self.proc.log()
        for marker in ("Traceback", "Fatal Python error", "Exception in callback",
                       "ring thread failed"):
            if marker in log:
                tail = log[log.index(marker):][:300].replace("\n", " | ")
                problems.append(f"crash: {marker} in serve's log: {tail}")
                break
        platform = self.proc.stats().get("platform", {})
        if not isinstance(platform, dict) or platform.get("pages_mapped") != platform.get(
                "pages_unmapped"):
            problems.append(f"leak: serve's grant counters unbalanced: {platform}")
        return problems


def _state(raw: str | None) -> int | None:
    value, exact = _number(raw)
    return value if exact else None


# ---- the world: one simulated host for the whole campaign -------------------------------------


class World:
    """The simulated host, the guest domain and the image, shared by every case."""

    def __init__(self, host: SimHost) -> None:
        self.host = host
        self.image = str(Path(host.sim_dir) / "disk.raw")
        with open(self.image, "wb") as f:
            f.truncate(IMAGE_BYTES)
        self.spec = toolstack.DiskSpec(GUEST, DEVID, "xvda", self.image, protocol=None)
        self.guest: SimGuest
        self.gxs: XenstoreClient
        self.domain: Domain
        self.removed = False
        self._new_guest()

    def _new_guest(self) -> None:
        self.guest = self.host.create_guest(GUEST, memory_pages=2048, grant_entries=4096)
        self.gxs = self.host.guest_xenstore(GUEST)
        domain = Domain.open(self.host.sim_dir, GUEST)
        assert domain is not None
        self.domain = domain

    def destroy_guest(self) -> None:
        """The guest dies: its grants and ports go with it (the backend keeps its pages)."""
        self.gxs.close()
        self.domain.release()
        self.host.destroy_guest(GUEST)

    def revive_guest(self) -> None:
        if GUEST not in self.host.guests:
            self._new_guest()

    @property
    def xs(self) -> XenstoreClient:
        assert self.host.xs is not None
        return self.host.xs

    def add_disk(self) -> None:
        self.removed = False
        with contextlib.suppress(XenstoreError):  # no error node yet (ENOENT)
            self.xs.rm(self.error_path)
        self.host.add_disk(self.spec, start_backend=False)

    @property
    def error_path(self) -> str:
        return f"/local/domain/0/error/backend/vbd/{GUEST}/{DEVID}"

    def backend_state_raw(self) -> str | None:
        return self.xs.read_str(f"{self.spec.backend_path}/state")

    def backend_nodes(self, names: tuple[str, ...]) -> dict[str, str | None]:
        return {n: self.xs.read_str(f"{self.spec.backend_path}/{n}") for n in names}

    def error_node(self) -> str | None:
        return self.xs.read_str(f"{self.error_path}/error")

    def toolstack_remove(self) -> None:
        """libxl's first removal step: online=0 (and Closing unless Closed)."""
        # (an int state compares equal to the XenbusState removal_nodes expects)
        nodes = toolstack.removal_nodes(_state(self.backend_state_raw()))  # type: ignore[arg-type]

        def write(tx: int) -> None:
            for name, value in nodes.items():
                self.xs.write(f"{self.spec.backend_path}/{name}", value, tx)

        self.xs.run_transaction(write)

    def delete_paths(self) -> None:
        self.removed = True
        self.xs.rm(self.spec.frontend_path)
        self.xs.rm(self.spec.backend_path)

    def mapped_refs(self) -> set[int]:
        """Refs of the guest that some backend has mapped now (GTF_reading/GTF_writing)."""
        flags = self.domain.grant_table["flags"]
        return {int(r) for r in ((flags & (GTF_READING | GTF_WRITING)) != 0).nonzero()[0]}

    def bound_ports(self) -> set[int]:
        """Guest ports bound by a backend (interdomain)."""
        states = self.domain.evtchn & 0xFF
        return {int(p) for p in (states == ECS_INTERDOMAIN).nonzero()[0]}

    def guest_ports(self) -> list[int]:
        """Ports of the guest in any state but free."""
        return [int(p) for p in ((self.domain.evtchn & 0xFF) != ECS_FREE).nonzero()[0]]

    def backend_ports(self) -> int:
        dom0 = Domain.open(self.host.sim_dir, 0)
        if dom0 is None:
            return 0
        try:
            return int((dom0.evtchn[1:] & 0xFF != ECS_FREE).sum())
        finally:
            dom0.release()


# ---- cases ---------------------------------------------------------------------------------------

KINDS = ("valid", "malformed", "after", "flap", "vanish", "flood", "race")
KIND_WEIGHTS = (20, 36, 10, 12, 14, 4, 4)

_GARBAGE = ["", " ", "abc", "-1", "-3", "0x10", "1e3", "1.5", "4294967296", "99999999999",
            "18446744073709551616", "9" * 300, "\u0661\u0662", "\u00b2", "1\x002", "+",
            "0" * 20, "nan", "\udcff"]
_INEXACT = [" {v}", "{v}\n", "+{v}", "\t{v} "]
_STATES = [str(s) for s in range(9)] + ["", "x", "-1", "99", " 4", "3\n", "4294967299", None]


def _case_rng(seed: int, index: int) -> random.Random:
    """Each case draws from its own generator: case N of a seed is the same in any run."""
    return random.Random(f"{NAME}:{seed}:{index}")


def _draw_kind(rng: random.Random) -> str:
    return rng.choices(KINDS, KIND_WEIGHTS)[0]


def case_kind(seed: int, index: int) -> str:
    """The kind of case ``index`` of ``seed`` (without running it)."""
    return _draw_kind(_case_rng(seed, index))


def runs_in_process(index: int) -> bool:
    return index % PROCESS_EVERY != PROCESS_EVERY - 1


class Case:
    """One scripted frontend against one backend; records problems as it goes."""

    def __init__(self, world: World, index: int, seed: int, subprocess: bool) -> None:
        self.world = world
        self.index = index
        self.rng = _case_rng(seed, index)
        self.kind = _draw_kind(self.rng)
        self.subprocess = subprocess
        self.notes: list[str] = []  # what was done, for the finding's case line
        self.problems: list[str] = []

    def describe(self) -> str:
        where = "serve subprocess" if self.subprocess else "in-process"
        return f"case {self.index} ({self.kind}, {where}): {'; '.join(self.notes)[:400]}"

    def problem(self, text: str) -> None:
        self.problems.append(text)

    # ---- the plan and the mutations ----

    def plan(self) -> Plan:
        rng = self.rng
        abi = rng.choice(ABI_NAMES)
        write_protocol = abi != DEFAULT_ABI or rng.random() < 0.7
        order = rng.choice([0, 0, 0, 1, 2, 3, 4])
        queues = rng.choice([1, 1, 1, 2, 3, 4])
        plan = Plan(abi, write_protocol, order, queues, rng.random() < 0.7,
                    order == 0 and rng.random() < 0.2)
        self.notes.append(f"{abi}{'' if write_protocol else ' (no protocol node)'} "
                          f"order {order} queues {queues}")
        return plan

    def mutate(self, front: Front, count: int) -> dict[str, str | None]:
        """``count`` hostile changes to the published nodes (None removes a node)."""
        rng = self.rng
        changes: dict[str, str | None] = {}
        for _ in range(count):
            names = sorted(set(front.nodes) | set(changes))
            name = rng.choice(names + ["multi-queue-num-queues", "ring-page-order"])
            what = rng.choice(["missing", "garbage", "inexact", "number", "stale", "readonly",
                               "foreign", "reserved", "duplicate", "port", "protocol"])
            value: str | None
            current = changes.get(name, front.nodes.get(name))
            if what == "missing":
                value = None
            elif what == "garbage":
                value = rng.choice(_GARBAGE)
            elif what == "inexact" and current is not None and current.isascii() \
                    and current.isdigit():
                value = rng.choice(_INEXACT).format(v=current)
            elif what == "number":
                value = str(rng.choice([0, 1, 2, 5, 7, 8, 16, 4095, 4096, 65535, 2**32 - 1,
                                        rng.randrange(2**32)]))
            elif what in ("stale", "readonly", "foreign", "reserved", "duplicate") and \
                    "ring-ref" in name:
                other = [v for k, v in front.nodes.items() if "ring-ref" in k and k != name]
                if what == "stale":
                    value = str(front.stale_ref())
                elif what == "readonly":
                    value = str(front.spare_grant(0, readonly=True))
                elif what == "foreign":
                    value = str(front.spare_grant(7))
                elif what == "reserved":
                    value = rng.choice(["0", "1", "7"])
                else:
                    value = rng.choice(other) if other else "1"
            elif what in ("port", "duplicate") and "event-channel" in name:
                other = [v for k, v in front.nodes.items()
                         if "event-channel" in k and k != name]
                if what == "duplicate" and other:
                    value = rng.choice(other)
                else:
                    value = str(front.spare_port(rng.choice([0, 7])))
            elif what == "protocol" or name == "protocol":
                value = rng.choice([*ABI_NAMES, "x86_64-abi ", "X86_64-ABI", "sparc-abi", "",
                                    "x86_64", "x86_64-abi\0", "a" * 2000])
            else:
                value = rng.choice(_GARBAGE)
            changes[name] = value
            self.notes.append(f"{name}={value!r:.40}")
        return changes

    # ---- checks ----

    def check(self, backend: InProcessBackend | ProcessBackend, front: Front,
              verdict: Verdict | None, when: str, expect_error: bool = True) -> None:
        """The backend's visible state against the judge's verdict after a step."""
        world = self.world
        state = _state(world.backend_state_raw())
        mapped = world.mapped_refs() & _granted(front)
        bound = world.bound_ports() & _ports(front)
        if backend.crash:
            self.problem(f"crash {when}: {backend.crash}")
            return
        if verdict is None:
            return
        connected = state == CONNECTED
        if verdict.connect is True and not connected:
            self.problem(f"{when}: valid frontend ({verdict.why}) not Connected: backend "
                         f"state {state}, error {world.error_node()!r:.120}")
        elif verdict.connect is False and connected:
            self.problem(f"{when}: Connected although {verdict.why}")
        # Closing keeps the ring until the frontend is Closed (spec §4.2, §4.3).
        if connected or (state == CLOSING and (mapped or bound)):
            if mapped != verdict.refs or bound != verdict.ports:
                self.problem(f"{when}: Connected with refs {sorted(mapped)} ports "
                             f"{sorted(bound)}, expected {sorted(verdict.refs)} "
                             f"{sorted(verdict.ports)}")
            return
        if mapped or bound:
            self.problem(f"{when}: not Connected (state {state}) but holds refs "
                         f"{sorted(mapped)} ports {sorted(bound)}")
        if verdict.connect is False and expect_error and not backend.finished:
            if state != CLOSING:
                self.problem(f"{when}: refused ({verdict.why}) but state {state}, not Closing")
            if world.error_node() is None:
                self.problem(f"{when}: refused ({verdict.why}) without an error node")

    def expect_state(self, allowed: set[int], when: str) -> None:
        state = _state(self.world.backend_state_raw())
        if state not in allowed:
            self.problem(f"{when}: backend state {state}, expected one of {sorted(allowed)}")


def _granted(front: Front) -> set[int]:
    refs = {ref for r in front.rings for ref in r.ring_refs}
    return refs | {ref for _, ref in front.spare_grants}


def _ports(front: Front) -> set[int]:
    return {r.event_channel for r in front.rings} | {p.port for p in front.spare_ports}


# ---- the scripts --------------------------------------------------------------------------------


def _connect_round(case: Case, backend: InProcessBackend | ProcessBackend, front: Front,
                   mutations: int) -> Verdict:
    """Publish (mutated) rings, go Initialised (or straight to Connected), one step."""
    rng = case.rng
    case.problems += [f"leak: {e}" for e in front.build_rings()]
    changes = case.mutate(front, mutations) if mutations else {}
    # Ring nodes of an earlier round go, as blkfront removes them.
    stale = [k for k in front.xs.directory(front.path) if neg.is_ring_node(k)]
    nodes = {**dict.fromkeys(stale), **front.nodes, **changes}
    front.nodes = {}
    front.publish(nodes, in_transaction=rng.random() < 0.8)
    verdict = judge(front.nodes, front.offered())
    state = INITIALISED if rng.random() < 0.85 else CONNECTED
    front.set_state(state)
    expect = {CONNECTED} if verdict.connect else {CLOSING} if verdict.connect is False \
        else {CONNECTED, CLOSING}
    backend.step(expect)
    case.check(backend, front, verdict, f"after Initialised ({verdict.why})")
    return verdict


def _io(case: Case, front: Front, verdict: Verdict, tag: int) -> None:
    """I/O on every queue, when the backend connected the rings the frontend really has
    and the frontend's grant handling is the one it published (feature-persistent)."""
    real = tuple((tuple(r.ring_refs), r.event_channel) for r in front.rings)
    persistent = "1" if front.plan.persistent else "0"
    if verdict.connect is not True or case.problems or verdict.queues != real \
            or verdict.abi != front.plan.abi \
            or front.nodes.get("feature-persistent") != persistent:
        return
    world = case.world
    if _state(world.backend_state_raw()) != CONNECTED:
        return
    problem = front.io(world.backend_nodes(neg.CONNECTED_NODES), tag)
    if problem:
        case.problem(problem)


def _close(case: Case, backend: InProcessBackend | ProcessBackend, front: Front) -> None:
    """blkfront's close: Closing, Closed; the backend must follow and let go of the ring."""
    if backend.finished:
        return
    front.set_state(CLOSING)
    backend.step({CLOSING})
    case.expect_state({CLOSING}, "frontend Closing")
    front.set_state(CLOSED)
    backend.step({CLOSED})
    case.expect_state({CLOSED}, "frontend Closed")
    if case.world.mapped_refs() & _granted(front):
        case.problem("frontend Closed but ring grants still mapped")


def script_valid(case: Case, backend: InProcessBackend | ProcessBackend, front: Front) -> None:
    rounds = case.rng.choice([1, 1, 2])
    for n in range(rounds):
        if n:
            front.set_state(INITIALISING)  # re-initialise: the backend returns to InitWait
            backend.step({INIT_WAIT})
            case.expect_state({INIT_WAIT}, "frontend re-initialising")
        verdict = _connect_round(case, backend, front, 0)
        if verdict.connect is not True:
            case.problem(f"the judge refused an unmutated frontend: {verdict.why}")
        _io(case, front, verdict, case.index + n)
        if case.rng.random() < 0.3:  # a watch firing again must change nothing
            backend.step({CONNECTED})
            case.check(backend, front, verdict, "spurious event")
        _close(case, backend, front)
        case.problems += [f"leak: {e}" for e in front.drop_rings()]


def script_malformed(case: Case, backend: InProcessBackend | ProcessBackend,
                     front: Front) -> None:
    verdict = _connect_round(case, backend, front, case.rng.choice([1, 1, 1, 2, 3]))
    _io(case, front, verdict, case.index)
    _close(case, backend, front)


def script_after(case: Case, backend: InProcessBackend | ProcessBackend, front: Front) -> None:
    """Valid rings, then the nodes change after Initialised: the backend keeps what it
    mapped (it read the nodes once, as blkback does) and is not disturbed."""
    verdict = _connect_round(case, backend, front, 0)
    changes = case.mutate(front, case.rng.choice([1, 2, 3]))
    front.publish(changes, in_transaction=False)
    for state in case.rng.choice([[], [INITIALISED], [CONNECTED], [INITIALISED, CONNECTED]]):
        front.set_state(state)
        case.notes.append(f"state {state}")
    backend.step({CONNECTED})
    case.check(backend, front, verdict, "nodes changed after Initialised")
    _io(case, front, verdict, case.index)
    _close(case, backend, front)


def script_flap(case: Case, backend: InProcessBackend | ProcessBackend, front: Front) -> None:
    """The frontend's state node walks anywhere (garbage and removal included); the backend
    may close, wait or unregister, but never connects with bad values; a valid frontend that
    then closes and re-initialises properly must connect again if the backend is still there."""
    rng = case.rng
    verdict = _connect_round(case, backend, front, rng.choice([0, 0, 1]))
    for _ in range(rng.randrange(2, 12)):
        state = rng.choice(_STATES)
        case.notes.append(f"state {state!r}")
        front.set_state(state)
        backend.step()
        # Closing after a flap, the backend may wait for the frontend's Closed: any state
        # will do, but a Connected one must hold exactly the valid rings.
        case.check(backend, front, dataclasses.replace(verdict, connect=None),
                   f"after state {state!r}", expect_error=False)
        if backend.finished:
            return
    _close(case, backend, front)
    if backend.finished or verdict.connect is not True:
        return
    front.set_state(INITIALISING)
    backend.step({INIT_WAIT})
    case.expect_state({INIT_WAIT}, "re-initialising after the flapping")
    verdict = _connect_round(case, backend, front, 0)
    _io(case, front, verdict, case.index)
    _close(case, backend, front)


def script_flood(case: Case, backend: InProcessBackend | ProcessBackend, front: Front) -> None:
    """A frontend cycling through failed connects must not flood the host's log."""
    verdict = _connect_round(case, backend, front, 1)
    while verdict.connect is not False:
        _close(case, backend, front)
        front.set_state(INITIALISING)
        backend.step({INIT_WAIT})
        verdict = _connect_round(case, backend, front, 1)
    for _ in range(LOG_LINES_MAX):
        for state, expect in ((CLOSED, CLOSED), (INITIALISING, INIT_WAIT),
                              (INITIALISED, CLOSING)):
            front.set_state(state)
            backend.step({expect})
    case.check(backend, front, verdict, "after cycling failed connects")
    _close(case, backend, front)


def script_vanish(case: Case, backend: InProcessBackend | ProcessBackend, front: Front) -> None:
    """The frontend disappears at some point of the handshake: the backend must unregister
    (it exits once the toolstack deleted the directories) holding nothing."""
    rng = case.rng
    world = case.world
    point = rng.choice(["published", "initialised", "connecting", "connected", "closing"])
    how = rng.choice(["directory", "grants", "domain"] + ["toolstack"] * (point != "connecting"))
    case.notes.append(f"vanish at {point} by {how}")

    def vanish() -> None:
        if how == "grants":
            for r in front.rings:  # what Linux does on a dying guest: end what it can
                # (an ended ref is the guest's to reuse: the ring must not end it again)
                r.ring_refs = [ref for ref in r.ring_refs if not world.guest.end_access(ref)]
        elif how == "domain":
            world.destroy_guest()
        world.xs.rm(world.spec.frontend_path)

    if point in ("published", "connecting"):
        front.build_rings()
        front.publish(front.nodes)
        if point == "connecting":  # between two of the backend's reads of the nodes
            front.set_state(INITIALISED)
            backend.between_reads(vanish, rng.randrange(1, 24))
    else:
        _connect_round(case, backend, front, rng.choice([0, 0, 1]))
        if point == "closing" and not backend.finished:
            front.set_state(CLOSING)
            backend.step({CLOSING})
    if point == "initialised":
        front.set_state(INITIALISED)  # written again; the backend has not looked yet
    if how == "toolstack":  # libxl's forced removal: online=0 + Closing, then the dir goes
        world.toolstack_remove()
        backend.step()
        world.xs.rm(world.spec.frontend_path)
    elif point != "connecting":
        vanish()
    backend.step()
    if not backend.subprocess and not backend.finished:
        case.problem(f"frontend vanished ({how}) but the backend did not unregister")
    if how != "domain":
        leftover = world.mapped_refs() & _granted(front)
        if leftover and not backend.subprocess:
            case.problem(f"frontend vanished but refs {sorted(leftover)} still mapped")


def script_race(case: Case, backend: InProcessBackend | ProcessBackend, front: Front) -> None:
    """The frontend rewrites its nodes while the backend reads them (between two reads):
    whatever the backend connects with must be rings and ports the frontend offered, each
    once; whatever it refused it must not hold."""
    rng = case.rng
    case.problems += [f"leak: {e}" for e in front.build_rings()]
    front.publish(front.nodes)
    changes = case.mutate(front, rng.choice([1, 2, 3]))
    front.set_state(INITIALISED)
    in_transaction = rng.random() < 0.5
    backend.between_reads(lambda: front.publish(changes, in_transaction),
                          rng.randrange(1, 24))
    state = _state(case.world.backend_state_raw())
    offered = front.offered()
    mapped = case.world.mapped_refs() & _granted(front)
    bound = case.world.bound_ports() & _ports(front)
    if backend.crash:
        case.problem(f"crash while the nodes changed under the reads: {backend.crash}")
    elif state == CONNECTED and not (mapped <= offered.refs and bound <= offered.ports
                                     and len(bound) in range(1, MAX_QUEUES + 1)):
        case.problem(f"Connected with refs {sorted(mapped)} ports {sorted(bound)} while "
                     f"the frontend offered {sorted(offered.refs)} {sorted(offered.ports)}")
    elif state != CONNECTED and (mapped or bound):
        case.problem(f"state {state} but holds refs {sorted(mapped)} ports {sorted(bound)}")
    _close(case, backend, front)


SCRIPTS: dict[str, Callable[[Case, InProcessBackend | ProcessBackend, Front], None]] = {
    "valid": script_valid,
    "malformed": script_malformed,
    "after": script_after,
    "flap": script_flap,
    "vanish": script_vanish,
    "flood": script_flood,
    "race": script_race,
}


# ---- running ------------------------------------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def _captured_logs() -> Iterator[_Records]:
    """Collect blkpy's log records (and keep them off the terminal) for the checks."""
    logger = logging.getLogger("blkpy")
    handler = _Records()
    saved = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate, level = saved[0], saved[1]
        logger.setLevel(level)


def run_case(world: World, seed: int, index: int, subprocess: bool,
             records: _Records) -> Case:
    """One handshake case from the world's idle state back to it; problems in ``.problems``."""
    case = Case(world, index, seed, subprocess)
    world.revive_guest()
    fds, threads, dom0_ports = _fds(), threading.active_count(), world.backend_ports()
    first_record = len(records.records)
    world.add_disk()
    front = Front(world, case.plan())
    backend: InProcessBackend | ProcessBackend
    backend = ProcessBackend(world) if subprocess else InProcessBackend(world)
    try:
        backend.start()
        case.expect_state({INIT_WAIT}, "backend start")
        SCRIPTS[case.kind](case, backend, front)
    except Exception:
        case.problem("harness error: " + traceback.format_exc(limit=-3).replace("\n", " | "))
    finally:
        if not world.removed:
            if not backend.finished:
                world.toolstack_remove()
                backend.step({CLOSED})
            if not backend.finished:  # libxl forces it after 10 s: the frontend dir goes
                world.xs.rm(world.spec.frontend_path)
                backend.step()
            if not backend.subprocess and not backend.finished:
                case.problem("toolstack removal did not unregister the device")
            world.delete_paths()
        case.problems += backend.close()
        if case.problems and isinstance(backend, ProcessBackend):
            case.problem(f"serve's log: {backend.log_tail()}")
        if backend.crash:
            case.problem(f"crash: {backend.crash}")
        if GUEST in world.host.guests:
            case.problems += [f"leak: {e}" for e in front.drop_rings()]
            case.problems += [f"leak: {e}" for e in front.release_spares()]
            if world.bound_ports():
                case.problem(f"leak: guest ports {sorted(world.bound_ports())} still bound")
        else:
            front.rings, front.spare_grants, front.spare_ports = [], [], []
        world.revive_guest()  # (a destroyed guest's fds went with it: compare like with like)
        if world.guest_ports():
            case.problem(f"harness leak: guest ports {world.guest_ports()} left open")
        if world.backend_ports() != dom0_ports:
            case.problem(f"leak: backend domain has {world.backend_ports()} ports bound, "
                         f"{dom0_ports} before")
        if not subprocess:
            if _fds() != fds:
                gc.collect()  # an fd closed by the collector was not leaked
            if _fds() != fds:
                case.problem(f"leak: {_fds()} fds open, {fds} before the case")
            if threading.active_count() != threads:
                case.problem(f"leak: {threading.active_count()} threads, {threads} before")
            _check_logs(case, records.records[first_record:])
    return case


def _check_logs(case: Case, records: list[logging.LogRecord]) -> None:
    for r in records:
        if r.exc_info or r.levelno >= logging.CRITICAL or "internal error" in r.getMessage():
            case.problem(f"crash: logged {r.levelname} {r.getMessage()[:200]!r} with "
                         f"{'a traceback' if r.exc_info else 'no traceback'}")
            break
    lines = [r for r in records if r.levelno >= logging.INFO]
    if len(lines) > LOG_LINES_MAX:
        case.problem(f"log flood: {len(lines)} lines in one case (first: "
                     f"{lines[0].getMessage()[:120]!r})")


def run(seed: int, scale: float, progress: Progress) -> CampaignResult:
    started = time.monotonic()
    cases = max(1, round(CASES_PER_SCALE * scale))
    findings = FindingLog(NAME, seed)
    kinds: dict[str, int] = {}
    processes = 0
    with SimHost(SERVE_ARGS) as host, _captured_logs() as records:
        world = World(host)
        for index in range(cases):
            subprocess = not runs_in_process(index)
            processes += subprocess
            case = run_case(world, seed, index, subprocess, records)
            kinds[case.kind] = kinds.get(case.kind, 0) + 1
            for problem in case.problems:
                findings.add(case.describe(), problem, kind=problem.split(":")[0][:60])
            del records.records[:]
            if (index + 1) % max(1, cases // 10) == 0:
                progress(f"{index + 1}/{cases} handshakes, {findings.total} problem(s)")
        world.domain.release()
        world.gxs.close()
    figures: dict[str, float | int | str] = {"in serve processes": processes}
    figures.update({f"{k}": v for k, v in sorted(kinds.items())})
    return CampaignResult(NAME, "handshakes", cases, time.monotonic() - started,
                          findings.findings, figures)
