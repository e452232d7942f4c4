"""The heap faulted in ahead of a takeover (blkpy.heap): allocations after ``prefault``
fault no fresh pages, and ``settle`` gives the memory back. Each case runs in its own
interpreter: the allocator's settings are the process's."""

import subprocess
import sys

_PROBE = """
import resource, sys
import numpy as np
from blkpy import heap

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

np.ones(16)  # numpy's own first-use allocations, before counting
if sys.argv[1] == "ahead":
    assert heap.prefault(8 << 20)
before = faults()
arrays = [np.ones(64 << 10, dtype=np.uint8) for _ in range(16)]  # 1 MiB, touched
taken = faults() - before
del arrays
rss = rss_kib()
heap.settle(8 << 20)
print(taken, rss - rss_kib())
"""


def _run(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[0]), int(out[1])


def test_allocations_after_a_prefault_take_no_fresh_pages_and_settle_gives_them_back():
    cold_faults, _ = _run("cold")
    warm_faults, given_back_kib = _run("ahead")
    assert cold_faults >= 200  # 256 pages of fresh heap, give or take numpy's
    assert warm_faults < 40
    assert given_back_kib >= 4 << 10  # most of the 8 MiB faulted in went back


def test_a_prefault_beyond_the_allocators_limit_is_refused():
    from blkpy import heap

    assert heap.prefault(64 << 20) is False
