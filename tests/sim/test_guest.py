"""The guest side of the simulated hypervisor: RAM, grant-table writes, domain life cycle."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkpy.sim.guest import SimGuest, create_sim_dir, remove_sim_dir
from blkpy.sim.hypervisor import (
    ECS_UNBOUND,
    GNTTAB_NR_RESERVED_ENTRIES,
    GTF_PERMIT_ACCESS,
    GTF_READING,
    GTF_READONLY,
    GTF_WRITING,
    Domain,
    evtchn_fields,
)


@pytest.fixture
def sim_dir():
    path = create_sim_dir()
    yield path
    remove_sim_dir(path)


@pytest.fixture
def guest(sim_dir):
    with SimGuest(sim_dir, 3, memory_pages=32, grant_entries=32) as g:
        yield g


def test_create_sim_dir_is_empty_and_removable():
    path = create_sim_dir()
    assert os.listdir(path) == []
    remove_sim_dir(path)
    assert not os.path.exists(path)


def test_alloc_pages_distinct_until_exhausted(guest):
    frames = guest.alloc_pages(20) + guest.alloc_pages(12)
    assert sorted(frames) == list(range(32))
    with pytest.raises(MemoryError):
        guest.alloc_pages(1)
    guest.free_pages(frames[:2])
    assert sorted(guest.alloc_pages(2)) == sorted(frames[:2])


def test_page_views_share_guest_memory(guest):
    (frame,) = guest.alloc_pages(1)
    guest.page(frame)[:4] = b"abcd"
    assert bytes(guest.memory[frame * 4096 : frame * 4096 + 4]) == b"abcd"
    assert len(guest.page(frame)) == 4096
    with pytest.raises(IndexError):
        guest.page(32)


def test_memory_is_shared_with_another_mapping(guest, sim_dir):
    (frame,) = guest.alloc_pages(1)
    guest.page(frame)[7] = 0x5A
    other = Domain(sim_dir, guest.domid)
    assert other.memory[frame * 4096 + 7] == 0x5A
    other.release()


def test_grant_access_writes_a_v1_entry(guest):
    rw = guest.grant_access(5, 0)
    ro = guest.grant_access(6, 7, readonly=True)
    assert rw >= GNTTAB_NR_RESERVED_ENTRIES and ro >= GNTTAB_NR_RESERVED_ENTRIES
    assert rw != ro
    assert guest.grant_entry(rw) == (GTF_PERMIT_ACCESS, 0, 5)
    assert guest.grant_entry(ro) == (GTF_PERMIT_ACCESS | GTF_READONLY, 7, 6)


def test_grant_table_full(guest):
    for _ in range(32 - GNTTAB_NR_RESERVED_ENTRIES):
        guest.grant_access(0, 0)
    with pytest.raises(MemoryError):
        guest.grant_access(0, 0)


def test_end_access_revokes_and_frees_the_ref(guest):
    ref = guest.grant_access(1, 0)
    assert guest.end_access(ref)
    assert guest.grant_entry(ref)[0] == 0
    assert ref in {guest.grant_access(2, 0) for _ in range(32 - GNTTAB_NR_RESERVED_ENTRIES)}


@pytest.mark.parametrize("busy", [GTF_READING, GTF_WRITING, GTF_READING | GTF_WRITING])
def test_end_access_refused_while_the_backend_uses_it(guest, busy):
    ref = guest.grant_access(1, 0)
    guest._domain.grant_table[ref]["flags"] |= busy  # what the hypervisor does on a map
    assert not guest.end_access(ref)
    assert guest.grant_entry(ref) == (GTF_PERMIT_ACCESS | busy, 0, 1)
    guest._domain.grant_table[ref]["flags"] = GTF_PERMIT_ACCESS
    assert guest.end_access(ref)


def test_domain_ids_are_unique_while_alive(guest, sim_dir):
    with pytest.raises(FileExistsError):
        SimGuest(sim_dir, guest.domid, memory_pages=1, grant_entries=16)


def test_close_removes_the_domain_and_frees_the_id(sim_dir):
    guest = SimGuest(sim_dir, 4, memory_pages=4, grant_entries=16)
    assert Domain.open(sim_dir, 4) is not None
    guest.close()
    guest.close()
    assert not (Path(sim_dir) / "dom4").exists()
    assert Domain.open(sim_dir, 4) is None
    SimGuest(sim_dir, 4, memory_pages=4, grant_entries=16).close()


def _create_and_vanish(sim_dir: str) -> None:
    SimGuest(sim_dir, 9, memory_pages=1, grant_entries=16)
    os._exit(0)  # the process dies without closing the domain


def test_a_dead_owners_domain_is_replaced(sim_dir):
    child = multiprocessing.get_context("fork").Process(target=_create_and_vanish, args=(sim_dir,))
    child.start()
    child.join()
    assert child.exitcode == 0
    SimGuest(sim_dir, 9, memory_pages=2, grant_entries=16).close()


@pytest.mark.parametrize("domid", [0, -1, 0x7FF0])
def test_guest_domid_must_be_a_guest_id(sim_dir, domid):
    with pytest.raises(ValueError):
        SimGuest(sim_dir, domid)


def test_alloc_unbound_port(guest):
    a = guest.alloc_unbound_port(0)
    b = guest.alloc_unbound_port(2)
    assert a.port != b.port and a.port > 0 and b.port > 0
    assert evtchn_fields(guest._domain.load_port(a.port)) == (ECS_UNBOUND, 0, 0)
    assert evtchn_fields(guest._domain.load_port(b.port)) == (ECS_UNBOUND, 2, 0)
    assert not a.ack()
    a.notify()  # unbound: goes nowhere, raises nothing
    b.close()
    assert guest._domain.load_port(b.port) == 0


# Model-based: any sequence of grants and revokes keeps the table equal to a dict model.
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("grant"), st.integers(0, 31), st.integers(0, 5), st.booleans()),
        st.tuples(st.just("end"), st.integers(0, 40)),
    ),
    max_size=60,
)


@settings(max_examples=40, deadline=None)
@given(ops=_ops)
def test_grant_table_follows_a_model(ops):
    sim_dir = create_sim_dir()
    try:
        with SimGuest(sim_dir, 3, memory_pages=32, grant_entries=32) as guest:
            model: dict[int, tuple[int, int, int]] = {}
            for op in ops:
                if op[0] == "grant":
                    _, frame, domid, readonly = op
                    if len(model) == 32 - GNTTAB_NR_RESERVED_ENTRIES:
                        continue
                    ref = guest.grant_access(frame, domid, readonly)
                    assert ref not in model
                    model[ref] = (GTF_PERMIT_ACCESS | (GTF_READONLY if readonly else 0), domid, frame)
                elif op[1] in model:
                    assert guest.end_access(op[1])
                    del model[op[1]]
            for ref in range(GNTTAB_NR_RESERVED_ENTRIES, 32):
                flags, domid, frame = guest.grant_entry(ref)
                if ref in model:
                    assert (flags, domid, frame) == model[ref]
                else:
                    assert flags == 0
            table = guest._domain.grant_table
            assert np.all(table["flags"][:GNTTAB_NR_RESERVED_ENTRIES] == 0)
    finally:
        remove_sim_dir(sim_dir)
