"""The sim platform against the guest side: grant maps, grant copy, event channels, counters."""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import multiprocessing
import select
import signal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkpy.platform import (
    COPY_SEGMENT_DTYPE,
    GNTST_BAD_COPY_ARG,
    GNTST_BAD_DOMAIN,
    GNTST_BAD_GNTREF,
    GNTST_OKAY,
    GNTST_PERMISSION_DENIED,
    GrantError,
    PlatformError,
    open_platform,
)
from blkpy.sim.guest import SimGuest, create_sim_dir, remove_sim_dir
from blkpy.sim.hypervisor import (
    ECS_INTERDOMAIN,
    ECS_UNBOUND,
    GTF_PERMIT_ACCESS,
    GTF_READING,
    GTF_READONLY,
    GTF_WRITING,
    evtchn_fields,
)
from blkpy.sim.platform import SimPlatform

GUEST = 5
PAGES = 64
WAIT_S = 10  # generous bound for cross-process waits; never a timing assertion


@pytest.fixture
def sim_dir():
    path = create_sim_dir()
    yield path
    remove_sim_dir(path)


@pytest.fixture
def guest(sim_dir):
    with SimGuest(sim_dir, GUEST, memory_pages=PAGES, grant_entries=64) as g:
        yield g


@pytest.fixture
def platform(sim_dir):
    p = SimPlatform(sim_dir)
    yield p
    p.close()


def _grant_pages(guest: SimGuest, n: int, readonly: bool = False) -> tuple[list[int], list[int]]:
    frames = guest.alloc_pages(n)
    for i, frame in enumerate(frames):
        guest.page(frame)[:] = bytes([i + 1]) * 4096
    return frames, [guest.grant_access(f, 0, readonly) for f in frames]


def _guest_mappings(guest: SimGuest) -> int:
    """How many grant mappings of guest frames this process has (0 = nothing left mapped):
    regions of the guest's RAM file smaller than the whole RAM, which the guest itself and
    the hypervisor's view map."""
    memory = f"dom{guest.domid}/memory"
    count = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(memory):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                count += end - start < guest.memory_pages * 4096
    return count


# ---- construction ----


def test_open_platform_sim_uses_the_environment(sim_dir, monkeypatch):
    monkeypatch.setenv("BLKPY_SIM_DIR", sim_dir)
    monkeypatch.setenv("XENSTORED_PATH", "/nonexistent/socket")
    p = open_platform("sim")
    assert p.name == "sim" and p.backend_domid == 0
    assert p.xenstore_path() == "/nonexistent/socket"
    p.close()


def test_missing_sim_dir_and_xenstore_are_clear_errors(sim_dir, monkeypatch):
    monkeypatch.delenv("BLKPY_SIM_DIR", raising=False)
    monkeypatch.delenv("XENSTORED_PATH", raising=False)
    with pytest.raises(PlatformError, match="BLKPY_SIM_DIR"):
        SimPlatform()
    with pytest.raises(PlatformError, match="does not exist"):
        SimPlatform(sim_dir + "/nowhere")
    p = SimPlatform(sim_dir)
    with pytest.raises(PlatformError, match="XENSTORED_PATH"):
        p.xenstore_path()
    p.close()


# ---- grant maps ----


def test_map_is_contiguous_in_ref_order_and_shared_both_ways(guest, platform):
    frames, refs = _grant_pages(guest, 4)
    order = [refs[2], refs[0], refs[3], refs[1]]
    with platform.map_grants(GUEST, order, writable=True) as m:
        assert m.count == 4 and m.writable
        view = m.buffer
        assert len(view) == 4 * 4096 and not view.readonly
        assert [view[i * 4096] for i in range(4)] == [3, 1, 4, 2]
        guest.page(frames[0])[10] = 0xEE  # guest -> backend
        assert view[4096 + 10] == 0xEE
        view[5] = 0x77  # backend -> guest
        assert guest.page(frames[2])[5] == 0x77
        assert ctypes.string_at(m.address + 3 * 4096, 2) == bytes([2, 2])


def test_mapping_consecutive_frames(guest, platform):
    frames, refs = _grant_pages(guest, 8)
    with platform.map_grants(GUEST, refs, writable=False) as m:
        assert m.buffer.readonly
        assert bytes(m.buffer[::4096]) == bytes(range(1, 9))


def test_map_sets_status_bits_and_blocks_revocation(guest, platform):
    _, (ref,) = _grant_pages(guest, 1)
    m = platform.map_grants(GUEST, [ref], writable=True)
    assert guest.grant_entry(ref)[0] == GTF_PERMIT_ACCESS | GTF_READING | GTF_WRITING
    assert not guest.end_access(ref)
    m.unmap()
    m.unmap()  # idempotent
    assert guest.grant_entry(ref)[0] == GTF_PERMIT_ACCESS
    assert guest.end_access(ref)
    assert _guest_mappings(guest) == 0


def test_double_mapping_keeps_the_grant_pinned(guest, platform):
    _, (ref,) = _grant_pages(guest, 1)
    persistent = platform.map_grants(GUEST, [ref], writable=True)
    transient = platform.map_grants(GUEST, [ref], writable=False)
    persistent.unmap()
    assert guest.grant_entry(ref)[0] == GTF_PERMIT_ACCESS | GTF_READING
    assert not guest.end_access(ref)
    transient.unmap()
    assert guest.end_access(ref)


def _write_readonly_mapping(sim_dir: str, ref: int) -> None:
    platform = SimPlatform(sim_dir)
    m = platform.map_grants(GUEST, [ref], writable=False)
    faulthandler.disable()  # the crash is expected: no traceback dump
    ctypes.memset(m.address, 0xFF, 1)  # must fault
    raise SystemExit(0)


def test_readonly_mapping_faults_on_write(guest, sim_dir):
    frames, (ref,) = _grant_pages(guest, 1, readonly=True)
    child = multiprocessing.get_context("fork").Process(
        target=_write_readonly_mapping, args=(sim_dir, ref)
    )
    child.start()
    child.join(WAIT_S)
    assert child.exitcode == -signal.SIGSEGV
    assert guest.page(frames[0])[0] == 1


def _bad_entry_cases():
    """Each case turns the second of three good grants bad in one way."""

    def out_of_table(guest, refs):
        refs[1] = 64

    def reserved(guest, refs):
        refs[1] = 1

    def wrong_domid(guest, refs):
        guest._domain.grant_table[refs[1]]["domid"] = 7

    def revoked(guest, refs):
        assert guest.end_access(refs[1])

    def readonly_grant(guest, refs):
        guest._domain.grant_table[refs[1]]["flags"] |= GTF_READONLY

    def not_permit_access(guest, refs):
        guest._domain.grant_table[refs[1]]["flags"] = 2  # GTF_accept_transfer

    def frame_outside_memory(guest, refs):
        guest._domain.grant_table[refs[1]]["frame"] = PAGES

    return [out_of_table, reserved, wrong_domid, revoked, readonly_grant, not_permit_access,
            frame_outside_memory]


@pytest.mark.parametrize("spoil", _bad_entry_cases(), ids=lambda f: f.__name__)
def test_bad_grant_fails_the_whole_batch(guest, platform, spoil):
    _, refs = _grant_pages(guest, 3)
    good = [refs[0], refs[2]]
    spoil(guest, refs)
    with pytest.raises(GrantError) as info:
        platform.map_grants(GUEST, refs, writable=True)
    assert info.value.errno == errno.EINVAL
    assert _guest_mappings(guest) == 0
    for ref in good:
        assert guest.grant_entry(ref)[0] == GTF_PERMIT_ACCESS
        assert guest.end_access(ref)
    assert platform.stats.pages_mapped == 0


def test_readonly_grant_maps_readonly(guest, platform):
    _, refs = _grant_pages(guest, 2, readonly=True)
    with platform.map_grants(GUEST, refs, writable=False) as m:
        assert guest.grant_entry(refs[0])[0] == GTF_PERMIT_ACCESS | GTF_READONLY | GTF_READING
        assert m.buffer[4096] == 2


@pytest.mark.parametrize("refs", [[], [-1], [2**40], "xyz", np.full(65537, 8)])
def test_malformed_ref_lists(guest, platform, refs):
    with pytest.raises(GrantError):
        platform.map_grants(GUEST, refs, writable=False)


def test_unknown_and_dead_domains(guest, platform, sim_dir):
    _, refs = _grant_pages(guest, 1)
    with pytest.raises(GrantError, match="domain 6"):
        platform.map_grants(6, refs, writable=False)
    with pytest.raises(GrantError):
        platform.map_grants(0, refs, writable=False)  # the backend's own domain
    platform.map_grants(GUEST, refs, writable=False).unmap()
    guest.close()
    with pytest.raises(GrantError, match="dying"):
        platform.map_grants(GUEST, refs, writable=False)


def test_mapping_outlives_the_guest_and_a_new_domain_is_seen(guest, platform, sim_dir):
    _, refs = _grant_pages(guest, 1)
    m = platform.map_grants(GUEST, refs, writable=True)
    guest.close()
    m.buffer[0] = 9  # the pages stay until unmapped, as with gntdev
    m.unmap()
    with SimGuest(sim_dir, GUEST, memory_pages=4, grant_entries=16) as reborn:
        frame = reborn.alloc_pages(1)[0]
        reborn.page(frame)[0] = 0x42
        ref = reborn.grant_access(frame, 0)
        with platform.map_grants(GUEST, [ref], writable=False) as m2:
            assert m2.buffer[0] == 0x42


def test_map_counters(guest, platform):
    _, refs = _grant_pages(guest, 3)
    m = platform.map_grants(GUEST, refs, writable=True)
    with pytest.raises(GrantError):
        platform.map_grants(GUEST, [63], writable=True)
    m.unmap()
    stats = platform.stats.as_dict()
    assert stats["map_calls"] == 2 and stats["pages_mapped"] == 3
    assert stats["unmap_calls"] == 1 and stats["pages_unmapped"] == 3


# Random grant tables: a batch maps iff every entry is valid for a writable/read-only map.
_entry = st.tuples(
    st.sampled_from([0, 1, 2, 3]),  # type bits
    st.booleans(),  # GTF_readonly
    st.sampled_from([0, 0, 0, 7]),  # granted-to domid
    st.integers(0, PAGES + 2),  # frame (>= PAGES is outside guest memory)
)


@settings(max_examples=60, deadline=None)
@given(
    entries=st.lists(_entry, min_size=1, max_size=24),
    picks=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    writable=st.booleans(),
)
def test_random_grant_tables(entries, picks, writable):
    sim_dir = create_sim_dir()
    try:
        with SimGuest(sim_dir, GUEST, memory_pages=PAGES, grant_entries=32) as guest:
            platform = SimPlatform(sim_dir)
            table = guest._domain.grant_table
            for i, (kind, ro, domid, frame) in enumerate(entries):
                table[8 + i] = (kind | (GTF_READONLY if ro else 0), domid, frame)
            guest.memory[::4096] = np.arange(PAGES, dtype=np.uint8)
            refs = [8 + p for p in picks]

            def valid(ref):
                if not 8 <= ref < 8 + len(entries):
                    return False
                kind, ro, domid, frame = entries[ref - 8]
                return kind == 1 and domid == 0 and frame < PAGES and not (writable and ro)

            before = table["flags"].copy()
            if all(valid(r) for r in refs):
                with platform.map_grants(GUEST, refs, writable) as m:
                    got = bytes(m.buffer[::4096])
                    assert got == bytes(entries[r - 8][3] for r in refs)
            else:
                with pytest.raises(GrantError):
                    platform.map_grants(GUEST, refs, writable)
                assert _guest_mappings(guest) == 0
            assert np.array_equal(table["flags"], before)
            platform.close()
    finally:
        remove_sim_dir(sim_dir)


# ---- grant copy ----


def _segments(rows):
    segs = np.zeros(len(rows), dtype=COPY_SEGMENT_DTYPE)
    for seg, (addr, ref, domid, offset, length, to_guest) in zip(segs, rows, strict=True):
        seg["local_addr"], seg["ref"], seg["domid"] = addr, ref, domid
        seg["offset"], seg["length"], seg["to_guest"] = offset, length, to_guest
    return segs


def test_grant_copy_statuses_and_data(guest, platform):
    frames, (rw, ro) = _grant_pages(guest, 2)
    guest.end_access(ro)
    ro = guest.grant_access(frames[1], 0, readonly=True)
    wrong = guest.grant_access(frames[0], 7)
    local = np.arange(8192, dtype=np.uint32).view(np.uint8)[:8192].copy()
    out = np.zeros(600, dtype=np.uint8)
    a = local.ctypes.data
    segs = _segments([
        (a + 4000, rw, GUEST, 512, 200, 1),  # local -> guest, local side crosses a page
        (out.ctypes.data, ro, GUEST, 100, 300, 0),  # guest read-only page -> local: fine
        (a, ro, GUEST, 0, 10, 1),  # write to a read-only grant
        (a, 999, GUEST, 0, 10, 0),  # ref outside the table
        (a, wrong, GUEST, 0, 10, 0),  # granted to another domain
        (a, rw, GUEST, 4000, 200, 0),  # crosses the guest page
        (a, rw, 6, 0, 10, 0),  # no such domain
    ])
    platform.grant_copy(segs)
    assert segs["status"].tolist() == [
        GNTST_OKAY, GNTST_OKAY, GNTST_PERMISSION_DENIED, GNTST_BAD_GNTREF,
        GNTST_PERMISSION_DENIED, GNTST_BAD_COPY_ARG, GNTST_BAD_DOMAIN,
    ]
    assert bytes(guest.page(frames[0])[512:712]) == local[4000:4200].tobytes()
    assert bytes(out[:300]) == bytes([2]) * 300
    assert guest.page(frames[1])[0] == 2  # the read-only page was not written
    for ref in (rw, ro):
        assert not guest.grant_entry(ref)[0] & (GTF_READING | GTF_WRITING)
    assert platform.stats.copy_calls == 1 and platform.stats.copy_segments == 7


def test_grant_copy_rejects_malformed_batches(platform):
    with pytest.raises(PlatformError):
        platform.grant_copy(np.zeros(2, dtype=np.uint8))
    with pytest.raises(PlatformError):
        platform.grant_copy(np.zeros(4, dtype=COPY_SEGMENT_DTYPE)[::2])
    platform.grant_copy(np.zeros(0, dtype=COPY_SEGMENT_DTYPE))


# ---- event channels ----


def _wait_readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], WAIT_S)[0])


def test_bind_notify_ack_in_one_process(guest, platform):
    port = guest.alloc_unbound_port(0)
    channel = platform.bind_interdomain(GUEST, port.port)
    assert channel.local_port > 0
    state, domid, remote = evtchn_fields(guest._domain.load_port(port.port))
    assert (state, domid, remote) == (ECS_INTERDOMAIN, 0, channel.local_port)
    assert not port.ack()
    channel.notify()
    channel.notify()  # still one pending event
    assert _wait_readable(port.fileno())
    assert port.ack()
    assert not port.ack()
    port.notify()
    assert _wait_readable(channel.fileno())
    assert channel.ack() and not channel.ack()
    assert platform.stats.notifies == 2 and platform.stats.wakeups == 1


def test_unbind_returns_the_guest_port_to_unbound(guest, platform):
    port = guest.alloc_unbound_port(0)
    channel = platform.bind_interdomain(GUEST, port.port)
    channel.close()
    channel.close()
    assert evtchn_fields(guest._domain.load_port(port.port)) == (ECS_UNBOUND, 0, 0)
    again = platform.bind_interdomain(GUEST, port.port)  # a frontend reconnect
    again.notify()
    assert _wait_readable(port.fileno()) and port.ack()


def test_bind_errors(guest, platform, sim_dir):
    offered_elsewhere = guest.alloc_unbound_port(3)
    port = guest.alloc_unbound_port(0)
    platform.bind_interdomain(GUEST, port.port)
    for domid, remote_port in [
        (6, port.port),  # no such domain
        (GUEST, port.port),  # already bound
        (GUEST, offered_elsewhere.port),  # offered to domain 3
        (GUEST, 0),
        (GUEST, 4096),
        (GUEST, 77),  # never allocated
    ]:
        with pytest.raises(PlatformError) as info:
            platform.bind_interdomain(domid, remote_port)
        assert info.value.errno == errno.EINVAL


def test_notify_to_a_dead_guest_is_silent(guest, platform):
    port = guest.alloc_unbound_port(0)
    channel = platform.bind_interdomain(GUEST, port.port)
    assert channel.ack()  # Xen marks a freshly bound port pending (events may have been lost)
    guest.close()
    channel.notify()
    assert not channel.ack()


def _guest_process(sim_dir: str, conn) -> None:
    """A guest in its own process: grants a page, offers a port, answers one event."""
    with SimGuest(sim_dir, GUEST, memory_pages=8, grant_entries=16) as guest:
        frame = guest.alloc_pages(1)[0]
        guest.page(frame)[:5] = b"guest"
        ref = guest.grant_access(frame, 0)
        port = guest.alloc_unbound_port(0)
        conn.send((ref, port.port))
        ok = _wait_readable(port.fileno()) and port.ack()
        conn.send((ok, bytes(guest.page(frame)[:7])))
        port.notify()
        conn.send(guest.end_access(ref))
        conn.recv()  # stay alive until the backend is done


def test_guest_and_backend_in_separate_processes(sim_dir):
    conn, child_conn = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(
        target=_guest_process, args=(sim_dir, child_conn)
    )
    child.start()
    try:
        platform = SimPlatform(sim_dir)
        assert conn.poll(WAIT_S)
        ref, guest_port = conn.recv()
        channel = platform.bind_interdomain(GUEST, guest_port)
        with platform.map_grants(GUEST, [ref], writable=True) as m:
            assert bytes(m.buffer[:5]) == b"guest"
            m.buffer[5:7] = b"!!"
            channel.notify()
            assert conn.poll(WAIT_S)
            assert conn.recv() == (True, b"guest!!")
            assert _wait_readable(channel.fileno()) and channel.ack()
            assert conn.poll(WAIT_S)
            assert conn.recv() is False  # still mapped: revocation refused
        conn.send("done")
        platform.close()
    finally:
        child.join(WAIT_S)
    assert child.exitcode == 0


def test_close_lets_go_of_the_backend_domain(sim_dir):
    """Regression (fuzz handshake): a closed platform kept its own domain's memory fd, so a
    process opening one platform per device leaked an fd per device."""
    import os

    SimPlatform(sim_dir, xenstore_path="unused").close()  # creates the backend domain
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        SimPlatform(sim_dir, xenstore_path="unused").close()
    assert len(os.listdir("/proc/self/fd")) == before
