"""Defaults and choices shared by the command line and the modules behind it, kept free of
heavy imports so that `blkpy` starts fast (under emulation numpy alone takes seconds)."""

import os

#: I/O engines of `blkpy serve --engine` (blkpy.engine.ENGINES implements them).
ENGINE_NAMES = ("auto", "sync", "thread", "uring")
#: queues offered to a multi-queue frontend (Linux blkback offers one per CPU).
MAX_QUEUES_DEFAULT = min(os.cpu_count() or 1, 4)
#: Cap on persistent grants per ring: what a Linux blkfront with a one-page ring keeps in
#: flight at most with the 256 indirect segments we advertise, 32 requests x (256 data pages
#: + 1 indirect page). Linux blkback's own default, 1056, is 32 x 11 x 3: sized for requests
#: without indirect segments, it leaves large requests to per-request maps (1 MiB reads at
#: QD8 then ran at a third of the speed, see README). Each grant costs a maptrack entry in
#: Xen for as long as it stays mapped; operators short of them lower --max-persistent-grants.
MAX_PERSISTENT_GRANTS = 32 * (256 + 1)
#: Upper bound of the ring loop's adaptive polling (µs): waking a sleeping process costs
#: ~50 µs on these VMs, so a busy ring is polled rather than slept on; the budget shrinks to
#: nothing while the device is idle (blkpy/gntdev/ringloop.c, adapt_poll).
POLL_US_DEFAULT = 200
#: `blkpy serve` exit statuses the hotplug daemon acts on: a successor could not take a
#: device over (do not try again), and a drained device handed over for an upgrade (start
#: the successor at once, from the code on disk)
EXIT_TAKEOVER_FAILED = 3
EXIT_HANDED_OVER = 75
