"""One hand-over at a time on a host: upgrades of several devices at once (`blkpy hotplug
restart` per device, side by side) load their new serves together, but each takes its
rings over alone, from its word to the old serve until its own rings are served. Two
hand-overs at the same moment share dom0's CPUs: in the lab, the new serves of two disks
upgraded together finish loading within a second of each other, and the guest requests
that waited through two windows at once took 198-212 ms where the others took 100-175.
Waiting for the turn costs the guest nothing: the old serve answers it meanwhile. (Held
on until the old serve had exited, a second later, the turn made every next hand-over
meet that exit or the new serve's first second instead: windows got longer.)

The turn is an exclusive flock on a file in the run directory: the kernel lets go of it
when its holder exits, however it exits."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

#: a turn held longer than this (a stuck holder) is not waited for any more
TURN_WAIT_S = 10.0
_POLL_S = 0.005


class HostTurn:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def take(self, timeout: float = TURN_WAIT_S) -> float | None:
        """Wait until no other hand-over of this host holds the turn, and hold it; the
        seconds waited, or None if it could not be had (a stuck holder, no run
        directory): the caller goes on without it."""
        start = time.monotonic()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() - start >= timeout:
                    os.close(fd)
                    return None
                time.sleep(_POLL_S)
                continue
            except OSError:
                os.close(fd)
                return None
            self._fd = fd
            return time.monotonic() - start

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let the next hand-over go (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # (closing the last descriptor drops the flock)
