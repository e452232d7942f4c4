"""The vbd backend's XenbusState machine (sans-IO), following Linux xen-blkback.

The driver (blkpy.serve) reads the nodes that matter (frontend state, our own state as the
toolstack may rewrite it, online, whether our directory still exists), feeds them here as a
``Snapshot`` on every watch event, and carries out the returned actions in order. Nothing
here touches xenstore, grants or files, so every transition is tested directly.
"""

from __future__ import annotations

import dataclasses
import enum


class XenbusState(enum.IntEnum):
    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


def parse_state(raw: str | None) -> XenbusState | None:
    """A state node's value; None for a missing node, UNKNOWN for garbage (hostile)."""
    if raw is None:
        return None
    try:
        return XenbusState(int(raw.strip()))
    except ValueError:
        return XenbusState.UNKNOWN


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the driver read from xenstore after an event."""

    frontend_state: XenbusState | None  # None: the node (or the frontend dir) is gone
    backend_state: XenbusState | None  # our own node as written by us or the toolstack
    online: bool
    backend_exists: bool = True


class Action:
    """Something the driver must do."""


@dataclasses.dataclass(frozen=True)
class SwitchState(Action):
    state: XenbusState


@dataclasses.dataclass(frozen=True)
class PublishFeatures(Action):
    """Write the nodes the frontend reads at InitWait (before switching to it)."""


@dataclasses.dataclass(frozen=True)
class Connect(Action):
    """Read the frontend's ring nodes, map, bind, publish disk nodes, then report back
    with ``connected()`` or ``failed()``. ``resume``: take over the rings of a serve that
    died, from its journals, writing nothing the frontend could see."""

    resume: bool = False


@dataclasses.dataclass(frozen=True)
class Disconnect(Action):
    """Finish or abandon in-flight I/O, unmap everything, unbind (idempotent)."""


@dataclasses.dataclass(frozen=True)
class Fatal(Action):
    """xenbus_dev_fatal: write the error node, then go Closing."""

    message: str


@dataclasses.dataclass(frozen=True)
class Exit(Action):
    """The device is gone: stop serving it."""


_ACTIVE_FRONTEND = {
    XenbusState.INIT_WAIT,
    XenbusState.INITIALISED,
    XenbusState.CONNECTED,
    XenbusState.CLOSING,
}


class BackendStateMachine:
    """One vbd's handshake. ``state`` is the value we last wrote to our state node."""

    def __init__(self) -> None:
        self.state = XenbusState.INITIALISING
        self.ring_connected = False
        self.finished = False

    def start(self) -> list[Action]:
        """Probe: publish features and wait for the frontend."""
        return [PublishFeatures(), *self._switch(XenbusState.INIT_WAIT)]

    def resume(self, snap: Snapshot) -> list[Action]:
        """A successor of a serve that died: if the device is connected (our node says
        Connected and the frontend is there), take its rings over without writing any
        state (Closing or Closed would kill the guest's disk, InitWait is ignored by a
        connected blkfront); otherwise start the handshake as usual."""
        if snap.backend_state == XenbusState.CONNECTED and snap.frontend_state in (
                XenbusState.INITIALISED, XenbusState.CONNECTED):
            self.state = XenbusState.CONNECTED
            return [Connect(resume=True)]
        return self.start()

    def _switch(self, state: XenbusState) -> list[Action]:
        if self.state == state:
            return []
        self.state = state
        return [SwitchState(state)]

    def _disconnect(self) -> list[Action]:
        if not self.ring_connected:
            return []
        self.ring_connected = False
        return [Disconnect()]

    def _exit(self, closed: bool = True) -> list[Action]:
        self.finished = True
        # Leave our state node saying Closed, as Linux's xenbus_dev_remove does: a toolstack
        # removing the device later must see it done, not wait 10 s for a backend that is
        # gone (libxl then forces the removal and skips the hotplug script).
        return [*self._disconnect(), *(self._switch(XenbusState.CLOSED) if closed else []),
                Exit()]

    def connected(self) -> list[Action]:
        """The driver mapped the ring(s) and published the disk nodes."""
        self.ring_connected = True
        return self._switch(XenbusState.CONNECTED)

    def failed(self, message: str) -> list[Action]:
        """Connecting failed (hostile or broken frontend nodes, map failure...)."""
        return [*self._disconnect(), Fatal(message), *self._switch(XenbusState.CLOSING)]

    def ring_broken(self, message: str) -> list[Action]:
        """The data path found the ring unusable (bogus producer index): stop it for good
        and tell the toolstack, like blkback halting a ring."""
        return self.failed(message)

    def on_change(self, snap: Snapshot) -> list[Action]:
        if self.finished:
            return []
        if not snap.backend_exists:
            return self._exit(closed=False)
        actions: list[Action] = []
        # The toolstack removes a device by writing online=0 and our state=Closing; if the
        # frontend is not there to answer, go straight to Closed (QEMU's rule), since libxl
        # waits only 10 s for Closed.
        if snap.backend_state == XenbusState.CLOSING and self.state != XenbusState.CLOSING:
            self.state = XenbusState.CLOSING
            if snap.frontend_state not in _ACTIVE_FRONTEND:
                actions += self._disconnect()
                actions += self._switch(XenbusState.CLOSED)
                if not snap.online:
                    actions += self._exit()
                return actions
        fe = snap.frontend_state
        if fe is None or fe == XenbusState.UNKNOWN:
            # Frontend gone (domain destroyed or its directory deleted): unregister.
            return [*actions, *self._exit()]
        if fe == XenbusState.INITIALISING:
            if self.state == XenbusState.CLOSED:  # frontend re-initialising: reconnect
                actions += self._switch(XenbusState.INIT_WAIT)
        elif fe in (XenbusState.INITIALISED, XenbusState.CONNECTED):
            # Both are handled alike: two watches may fire before we read the first.
            if self.state == XenbusState.CONNECTED and self.ring_connected:
                return actions
            if self.state == XenbusState.CLOSING:
                return actions  # we are tearing down; the frontend must close first
            actions += self._disconnect()
            actions.append(Connect())
        elif fe == XenbusState.CLOSING:
            actions += self._switch(XenbusState.CLOSING)
        elif fe == XenbusState.CLOSED:
            actions += self._disconnect()
            actions += self._switch(XenbusState.CLOSED)
            if not snap.online:
                actions += self._exit()
        elif fe != XenbusState.INIT_WAIT:
            actions += self.failed(f"saw state {int(fe)} at frontend")
        if (
            not snap.online
            and self.state == XenbusState.CLOSED
            and not self.finished
            and not any(isinstance(a, Exit) for a in actions)
        ):
            actions += self._exit()
        return actions
