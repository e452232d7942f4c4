"""Campaign 1 (fuzzed ring requests) and its oracle."""

import struct

import pytest

from blkpy import grants
from blkpy.fuzz import FindingLog, ring_requests
from blkpy.fuzz.oracle import (
    LAYOUTS,
    OP_DISCARD,
    OP_INDIRECT,
    OP_READ,
    OP_WRITE,
    Class,
    Disk,
    Grants,
    judge,
)

DISK = Disk(sectors=1024, sector_size=512, readonly=False, discard=True)
GRANTS = Grants(frozenset({10, 11}), frozenset({20}), frozenset({30}))


def _slot(abi: str, op: int, byte1: int, sector: int, segs=(), nr_sectors=None) -> bytes:
    lay = LAYOUTS[abi]
    slot = bytearray(lay.entry_size)
    slot[0], slot[1] = op, byte1
    struct.pack_into("<Q", slot, lay.id_off, 0x1234)
    struct.pack_into("<Q", slot, lay.sector_off, sector)
    for k, seg in enumerate(segs):
        struct.pack_into("<IBB", slot, lay.after + 8 * k, *seg)
    if nr_sectors is not None:
        struct.pack_into("<Q", slot, lay.after, nr_sectors)
    return bytes(slot)


def _judge(slot: bytes, abi="x86_64-abi", disk=DISK, pages=None):
    return judge(LAYOUTS[abi], slot, disk, GRANTS, (pages or {}).get)


@pytest.mark.parametrize("abi", sorted(LAYOUTS))
def test_oracle_verdicts(abi):
    def j(*a, **k):
        return _judge(_slot(abi, *a, **k), abi)

    assert j(OP_READ, 1, 0, [(10, 0, 7)]).klass is Class.VALID
    assert j(OP_READ, 1, 0, [(20, 0, 7)]).klass is Class.INVALID  # read into a read-only grant
    assert j(OP_WRITE, 1, 0, [(20, 0, 7)]).klass is Class.VALID
    assert j(OP_WRITE, 1, 0, [(99, 0, 7)]).klass is Class.INVALID  # never granted
    assert j(OP_READ, 1, 1020, [(10, 0, 7)]).klass is Class.INVALID  # past the end
    assert j(OP_READ, 1, 2**64 - 4, [(10, 0, 7)]).klass is Class.INVALID  # u64 wrap
    assert j(OP_READ, 1, 0, [(10, 5, 4)]).klass is Class.INVALID
    assert j(OP_READ, 0, 0).klass is Class.INVALID
    assert j(3, 0, 2**64 - 1).klass is Class.VALID  # an empty flush has no range
    assert j(OP_DISCARD, 0, 8, nr_sectors=16).klass is Class.VALID
    assert j(OP_DISCARD, 1, 8, nr_sectors=16).klass is Class.INVALID  # secure
    assert j(4, 0, 0).klass is Class.INVALID
    ro = Disk(sectors=1024, sector_size=512, readonly=True, discard=False)
    assert _judge(_slot(abi, OP_WRITE, 1, 0, [(10, 0, 7)]), abi, ro).klass is Class.INVALID
    big = Disk(sectors=1024, sector_size=4096, readonly=False, discard=True)
    assert _judge(_slot(abi, OP_READ, 1, 8, [(10, 0, 7)]), abi, big).klass is Class.VALID
    assert _judge(_slot(abi, OP_READ, 1, 9, [(10, 0, 7)]), abi, big).klass is Class.INVALID
    assert _judge(_slot(abi, OP_READ, 1, 8, [(10, 0, 3)]), abi, big).klass is Class.INVALID


def test_oracle_indirect_reads_the_descriptor_page():
    lay = LAYOUTS["x86_32-abi"]
    slot = bytearray(_slot("x86_32-abi", OP_INDIRECT, OP_READ, 16))
    struct.pack_into("<H", slot, 2, 2)
    struct.pack_into("<I", slot, lay.indirect_grefs_off, 11)
    page = struct.pack("<IBBH", 10, 0, 7, 0) + struct.pack("<IBBH", 10, 0, 3, 0)
    e = _judge(bytes(slot), "x86_32-abi", pages={11: page.ljust(4096, b"\0")})
    assert e.klass is Class.VALID and e.rsp_op == OP_READ
    assert [p.sector for p in e.pieces] == list(range(16, 28))
    assert _judge(bytes(slot), "x86_32-abi").klass is Class.INVALID  # page not granted


def test_short_campaign_finds_nothing():
    result = ring_requests.run(seed=7, scale=0.5, progress=lambda _: None)
    assert result.count >= 4000
    assert [f.line() for f in result.findings] == []


def test_campaign_catches_a_planted_batch_bug(monkeypatch):
    # The class of the outside fuzzer's bug: an indirect request of the batch loses its
    # descriptors because another one was bad. The campaign must see it.
    real = grants.fetch_indirect

    def lossy(platform, domid, grefs, counts, mapper=None):
        out = real(platform, domid, grefs, counts, mapper)
        if len(out) > 1:
            out[max(out)] = None
        return out

    monkeypatch.setattr("blkpy.vbd.fetch_indirect", lossy)
    config = ring_requests.Config("x86_64-abi", 0, "persistent", False, 512, "sync")
    findings = FindingLog("ring", 3)
    ring_requests._run_config(config, 3, 1500, findings)
    assert any("valid read refused" in k or "valid write refused" in k
               for k in findings.counts)
