"""The simulated guest's block frontend, modelled on Linux xen-blkfront.

Public API (what a simulated host and the tests use)::

    fe = Frontend(guest, xs, devid, abi="x86_64-abi", max_ring_page_order=0,
                  max_indirect_segments=32, persistent=True, num_queues=1)
    info = fe.connect(timeout=10.0)     # xenbus handshake -> DiskInfo
    c = fe.write(sector, data)          # synchronous helpers -> Completion (.status, .data)
    c = fe.read(sector, nbytes)
    fe.flush(); fe.barrier(data=None); fe.discard(sector, nr_sectors, secure=False)
    fe.rings / fe.ring                  # BlkfrontRing per queue / the first one:
                                        # submit/push/poll/wait_all for queue depth > 1,
                                        # submit_raw for hostile tests
    fe.service(timeout)                 # react to backend changes (resize, toolstack close)
    errors = fe.close(timeout=10.0)     # Closing -> backend -> Closed; revokes all grants
    fe.connect()                        # again: Initialising and a fresh handshake

``guest`` is a SimGuest (blkpy.sim.guest), ``xs`` a XenstoreClient connected as the guest
domain, ``devid`` the vbd number; the toolstack must have created the frontend directory
/local/domain/<domid>/device/vbd/<devid> with ``backend``, ``backend-id`` and state 1.
Protocol violations (bogus responses, grants the backend keeps mapped) raise
``ProtocolError`` and are listed in ``fe.protocol_errors``.

Handshake (xenbus-vbd spec §4): on backend InitWait, only while Initialising, read
max-ring-page-order and multi-queue-max-queues, allocate and grant the rings and event
channels, write ring-ref(s) (under queue-N/ with several queues), event-channel, protocol
and feature-persistent in one transaction, go Initialised; on backend Connected read the
disk's properties (``blkfront_negotiation``) and go Connected. One deliberate difference
from Linux: a Closed backend seen while we re-initialise is waited for (it re-enters
InitWait), not taken as a reason to close.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from blkpy import ring as blkif
from blkpy.sim import blkfront_negotiation as neg
from blkpy.sim.blkfront_negotiation import Action, DiskInfo, NegotiationError
from blkpy.sim.blkfront_ring import BlkfrontRing, Completion, ProtocolError

__all__ = ["Completion", "DiskInfo", "Frontend", "NegotiationError", "ProtocolError"]

_WATCH_TOKEN = "blkfront-backend-state"
_POLL_SLICE = 0.5  # re-read the state at least this often, in case an event was missed


class Frontend:
    """One vbd of a simulated guest (a single queue)."""

    def __init__(
        self,
        guest: Any,
        xs: Any,
        devid: int,
        *,
        abi: str = "x86_64-abi",
        max_ring_page_order: int = 0,
        max_indirect_segments: int = 32,
        persistent: bool = True,
        num_queues: int = 1,
        readonly_write_grants: bool = False,
    ) -> None:
        self.guest = guest
        self.xs = xs
        self.devid = devid
        self.protocol = neg.protocol_name(abi)
        self.abi = blkif.ABIS[self.protocol]
        if not 0 <= max_ring_page_order <= neg.MAX_RING_PAGE_ORDER:
            raise ValueError(f"max_ring_page_order must be 0..{neg.MAX_RING_PAGE_ORDER}")
        self.max_ring_page_order = max_ring_page_order
        self.max_indirect_segments = max_indirect_segments
        self.want_persistent = persistent
        if num_queues < 1:
            raise ValueError("num_queues must be at least 1")
        self.num_queues = num_queues
        self.readonly_write_grants = readonly_write_grants
        self.path = f"/local/domain/{guest.domid}/device/vbd/{devid}"
        self.rings: list[BlkfrontRing] = []  # one per queue
        self.info: DiskInfo | None = None
        self.protocol_errors: list[str] = []
        self._backend_path: str | None = None
        self._backend_id = 0

    @property
    def ring(self) -> BlkfrontRing | None:
        """The first queue's ring (the only one unless several queues were negotiated)."""
        return self.rings[0] if self.rings else None

    # ---- xenstore helpers ----------------------------------------------------------

    @property
    def state(self) -> int:
        return self._read_state(self.path)

    def _read_state(self, base: str) -> int:
        raw = self.xs.read_str(f"{base}/state")
        try:
            return int(raw) if raw is not None else neg.UNKNOWN
        except ValueError:
            return neg.UNKNOWN

    def _switch_state(self, state: int) -> None:
        self.xs.write(f"{self.path}/state", str(state))

    def _backend_nodes(self, keys: tuple[str, ...]) -> dict[str, str | None]:
        return {k: self.xs.read_str(f"{self._backend_path}/{k}") for k in keys}

    def _locate_backend(self) -> None:
        backend = self.xs.read_str(f"{self.path}/backend")
        backend_id = self.xs.read_str(f"{self.path}/backend-id")
        if backend is None or backend_id is None:
            raise NegotiationError(f"{self.path} has no backend/backend-id nodes")
        if self._backend_path != backend:
            if self._backend_path is not None:
                self.xs.unwatch(f"{self._backend_path}/state", _WATCH_TOKEN)
            self.xs.watch(f"{backend}/state", _WATCH_TOKEN)
        self._backend_path = backend
        self._backend_id = int(backend_id)

    def _wait_backend(self, deadline: float) -> bool:
        """Sleep until the backend state may have changed; False once past ``deadline``."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.xs.wait_event(min(remaining, _POLL_SLICE))
        self.xs.events()  # drop the rest: the state is re-read anyway
        return True

    @property
    def backend_state(self) -> int:
        return self._read_state(self._backend_path) if self._backend_path else neg.UNKNOWN

    # ---- connect -------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> DiskInfo:
        """Run the handshake until both sides are Connected; returns the disk's info.

        Raises NegotiationError on a fatal backend answer or a timeout."""
        deadline = time.monotonic() + timeout
        self._locate_backend()
        own = self.state
        if own != neg.INITIALISING:
            # a re-connect (after close(), or a frontend that crashed mid-way)
            self._drop_rings()
            self._switch_state(neg.INITIALISING)
            own = neg.INITIALISING
        while True:
            backend = self.backend_state
            if own == neg.INITIALISING and backend == neg.CLOSED:
                action = Action.IGNORE  # the backend will come back to InitWait
            else:
                action = neg.on_backend_state(own, backend)
            if action is Action.TALK:
                self._talk_to_blkback()
                own = neg.INITIALISED
                continue
            if action is Action.CONNECT:
                self._blkfront_connect()
                return self.info  # type: ignore[return-value]
            if action is Action.CLOSE:
                raise NegotiationError(f"backend went to state {backend} while connecting")
            if not self._wait_backend(deadline):
                raise NegotiationError(
                    f"timed out after {timeout}s: frontend {own}, backend {backend}"
                )

    def _talk_to_blkback(self) -> None:
        nodes = self._backend_nodes(neg.INIT_WAIT_NODES)
        order = neg.choose_ring_order(self.max_ring_page_order, nodes)
        queues = neg.choose_queues(self.num_queues, nodes)
        self._drop_rings()
        self.rings = [
            BlkfrontRing(
                self.guest,
                self._backend_id,
                self.abi,
                order,
                handle=self.devid,
                readonly_write_grants=self.readonly_write_grants,
            )
            for _ in range(queues)
        ]
        published = neg.queue_nodes(
            order,
            [(r.ring_refs, r.event_channel) for r in self.rings],
            self.protocol,
            self.want_persistent,
        )

        def publish(tx: int) -> None:
            # Ring nodes of an earlier connection (another order or queue count) must go.
            for key in self.xs.directory(self.path, tx):
                if neg.is_ring_node(key) and not any(
                    k == key or k.startswith(f"{key}/") for k in published
                ):
                    self.xs.rm(f"{self.path}/{key}", tx)
            for key, value in published.items():
                self.xs.write(f"{self.path}/{key}", value, tx)

        self.xs.run_transaction(publish)
        self._switch_state(neg.INITIALISED)

    def _blkfront_connect(self) -> None:
        nodes = self._backend_nodes(neg.CONNECTED_NODES)
        try:
            info = neg.parse_backend_connected(
                nodes,
                persistent=self.want_persistent,
                max_indirect_segments=self.max_indirect_segments,
            )
        except NegotiationError:
            self._switch_state(neg.CLOSING)  # xenbus_dev_fatal
            raise
        self.info = info
        for ring in self.rings:
            ring.attach(info)
        self._switch_state(neg.CONNECTED)

    # ---- close ---------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> list[str]:
        """Drain, go Closing, wait for the backend, go Closed, wait for the backend to
        release the ring, then revoke every grant. Returns protocol errors found."""
        deadline = time.monotonic() + timeout
        errors = self._drain(deadline)
        self._switch_state(neg.CLOSING)
        while self.backend_state not in (neg.CLOSING, neg.CLOSED, neg.UNKNOWN):
            if not self._wait_backend(deadline):
                errors.append(f"backend stayed in state {self.backend_state} after Closing")
                break
        return self._finish_close(deadline, errors)

    def service(self, timeout: float = 0.0) -> Action:
        """React to backend state changes, as blkback_changed() does while connected:
        a Connected backend again is a resize (the disk's properties are re-read), a
        Closing/Closed backend (e.g. the toolstack removing the disk) makes us drain, go
        Closed and release the ring. Waits up to ``timeout`` for a watch event."""
        self.xs.wait_event(timeout)
        self.xs.events()
        action = neg.on_backend_state(self.state, self.backend_state)
        if action is Action.CONNECT and self.state == neg.CONNECTED:
            self._blkfront_connect()
        elif action is Action.CLOSE and self.state in (neg.INITIALISED, neg.CONNECTED):
            deadline = time.monotonic() + 10.0
            self._finish_close(deadline, self._drain(deadline))
        else:
            action = Action.IGNORE
        return action

    def _drain(self, deadline: float) -> list[str]:
        errors = []
        for ring in self.rings:
            if ring.in_flight and not ring.failed:
                try:
                    ring.wait_all(max(deadline - time.monotonic(), 0.1))
                except ProtocolError as exc:
                    errors.append(str(exc))
        return errors

    def _finish_close(self, deadline: float, errors: list[str]) -> list[str]:
        self._switch_state(neg.CLOSED)
        while self.backend_state not in (neg.CLOSED, neg.UNKNOWN):
            if not self._wait_backend(deadline):
                errors.append(f"backend stayed in state {self.backend_state} after Closed")
                break
        errors.extend(self._drop_rings())
        self.info = None
        self.protocol_errors.extend(errors)
        return errors

    def _drop_rings(self) -> list[str]:
        errors = []
        for ring in self.rings:
            if ring.failed and ring.failed not in self.protocol_errors:
                self.protocol_errors.append(ring.failed)
            errors.extend(ring.close())
        self.rings = []
        return errors

    # ---- synchronous I/O helpers -------------------------------------------------------

    def _one(self, op: int, sector: int, timeout: float, **kw: Any) -> Completion:
        ring = self._ring()
        ring.submit(op, sector, **kw)
        ring.push()
        try:
            (done,) = ring.wait_all(timeout)
        except ProtocolError as exc:
            self.protocol_errors.append(str(exc))
            raise
        return done

    def _ring(self) -> BlkfrontRing:
        if not self.rings or self.info is None:
            raise RuntimeError("frontend is not connected")
        return self.rings[0]

    def read(self, sector: int, nbytes: int, *, timeout: float = 10.0, **kw: Any) -> Completion:
        return self._one(blkif.BLKIF_OP_READ, sector, timeout, nbytes=nbytes, **kw)

    def write(
        self, sector: int, data: bytes | np.ndarray, *, timeout: float = 10.0, **kw: Any
    ) -> Completion:
        return self._one(blkif.BLKIF_OP_WRITE, sector, timeout, data=data, **kw)

    def flush(
        self, data: bytes | None = None, sector: int = 0, timeout: float = 10.0
    ) -> Completion:
        return self._one(blkif.BLKIF_OP_FLUSH_DISKCACHE, sector, timeout, data=data)

    def barrier(
        self, data: bytes | None = None, sector: int = 0, timeout: float = 10.0
    ) -> Completion:
        return self._one(blkif.BLKIF_OP_WRITE_BARRIER, sector, timeout, data=data)

    def discard(
        self, sector: int, nr_sectors: int, *, secure: bool = False, timeout: float = 10.0
    ) -> Completion:
        return self._one(
            blkif.BLKIF_OP_DISCARD, sector, timeout, nr_sectors=nr_sectors, secure=secure
        )
