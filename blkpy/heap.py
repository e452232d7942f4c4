"""The process heap, faulted in ahead of a takeover (blkpy/gntdev/heap.c).

A takeover allocates while the guest waits: the image's tables, numpy's temporaries,
the ring loop's buffers. Each fresh page is a fault, and in the lab's emulated PV dom0
one costs about 0.2 ms: an upgrade's window faulted hundreds. A successor therefore
faults in PREFAULT_BYTES of heap while its predecessor still serves, has allocations up
to that size served from the heap and keeps what is freed there, and gives the rest back
once it serves the rings (``settle``)."""

from __future__ import annotations

import logging
import os

from blkpy.gntdev.native import lib

log = logging.getLogger(__name__)

#: what a takeover's allocations reach at most (the lab's qcow2 takeover: about 1 MiB)
PREFAULT_BYTES = 4 << 20


def prefault(nbytes: int = PREFAULT_BYTES) -> bool:
    """Fault in ``nbytes`` of heap for the allocations to come; False if glibc refused."""
    err = lib.blkpy_heap_prefault(nbytes)
    if err < 0:
        log.debug("no heap faulted in ahead: %s", os.strerror(-err))
        return False
    return True


def settle(nbytes: int = PREFAULT_BYTES) -> None:
    """The takeover is over: what the heap holds free goes back to the system."""
    lib.blkpy_heap_settle(nbytes)
