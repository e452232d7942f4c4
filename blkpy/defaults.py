"""Defaults and choices shared by the command line and the modules behind it, kept free of
heavy imports so that `blkpy` starts fast (under emulation numpy alone takes seconds)."""

import os

#: I/O engines of `blkpy serve --engine` (blkpy.engine.ENGINES implements them).
ENGINE_NAMES = ("sync", "thread", "uring")
#: queues offered to a multi-queue frontend (Linux blkback offers one per CPU).
MAX_QUEUES_DEFAULT = min(os.cpu_count() or 1, 4)
#: Linux blkback's default cap on persistent grants per ring (max_persistent_grants).
MAX_PERSISTENT_GRANTS = 1056
#: Upper bound of the ring loop's adaptive polling (µs): waking a sleeping process costs
#: ~50 µs on these VMs, so a busy ring is polled rather than slept on; the budget shrinks to
#: nothing while the device is idle (blkpy/gntdev/ringloop.c, adapt_poll).
POLL_US_DEFAULT = 200
