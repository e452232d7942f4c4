"""/proc figures of a process: own memory, fds, mappings with guest memory apart."""

import mmap
import os
from pathlib import Path

import pytest

from blkpy.sim import procinfo
from blkpy.sim.hypervisor import create_sim_dir, remove_sim_dir


@pytest.fixture
def guest_dir():
    """Where the simulator keeps guest memory (shared memory, as the serve sees it)."""
    sim_dir = create_sim_dir()
    yield Path(sim_dir)
    remove_sim_dir(sim_dir)


def test_sample_counts_fds_and_sets_guest_mappings_apart(guest_dir):
    memory = guest_dir / "memory"
    memory.write_bytes(b"\0" * 3 * mmap.PAGESIZE)
    before = procinfo.sample(os.getpid(), str(guest_dir))
    with open(memory, "r+b") as f:
        # three separate mappings of guest memory, as three persistent grants would be
        maps = [mmap.mmap(f.fileno(), mmap.PAGESIZE, offset=i * mmap.PAGESIZE)
                for i in range(3)]
        during = procinfo.sample(os.getpid(), str(guest_dir))
        for m in maps:
            m[0] = 1  # resident shared pages: RssShmem, not the process's own
        touched = procinfo.sample(os.getpid(), str(guest_dir))
        for m in maps:
            m.close()
    assert during.fds == before.fds + 4  # the file, and the dup each Python mmap keeps
    assert during.guest_maps == before.guest_maps + 3
    # the process's own mappings barely move (a map of the file's neighbours may merge)
    assert abs(during.maps - before.maps) <= 1
    assert touched.rss_shmem >= before.rss_shmem + 3 * mmap.PAGESIZE // 1024
    assert touched.own_kib > 0 and touched.rss_kib == touched.own_kib + touched.rss_shmem
    unfiltered = procinfo.sample(os.getpid())
    assert unfiltered.guest_maps == 0 and unfiltered.maps >= during.maps - 3
