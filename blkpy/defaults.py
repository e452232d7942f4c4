"""Defaults and choices shared by the command line and the modules behind it, kept free of
heavy imports so that `blkpy` starts fast (under emulation numpy alone takes seconds)."""

import os

#: I/O engines of `blkpy serve --engine` (blkpy.engine.ENGINES implements them).
ENGINE_NAMES = ("sync", "thread", "uring")
#: queues offered to a multi-queue frontend (Linux blkback offers one per CPU).
MAX_QUEUES_DEFAULT = min(os.cpu_count() or 1, 4)
#: Linux blkback's default cap on persistent grants per ring (max_persistent_grants).
MAX_PERSISTENT_GRANTS = 1056
