"""Images made by qemu-img/qemu-io, read by blkpy, compared byte for byte with
``qemu-img convert -O raw``."""

from __future__ import annotations

import os
import random

import pytest
from qemu_img import as_raw, needs_qemu, qemu_img, qemu_io, read_all

from blkpy.backends.qcow2 import Qcow2Disk

pytestmark = needs_qemu
MiB = 1 << 20


def _fill(path: str, size: int, cs: int, v3: bool = True) -> None:
    """Data, zeroes (with and without unmap), discards, unaligned to clusters."""
    first = max(cs * 3 // 2 // 512 * 512, 1024)
    qemu_io(path,
            f"write -P 0x11 0 {first}",
            f"write -P 0x22 {size // 2 + 512} 5120",
            f"write -z {cs} {cs}",
            f"write -z -u {size // 2} {cs}",
            f"discard {size // 4} {2 * cs}",
            f"write -P 0x33 {size - 4096} 4096",
            f"write -P 0x44 {size // 4 + 512} 1024")


def _create(path: str, size: int, *opts: str, backing: str | None = None,
            backing_fmt: str | None = None) -> str:
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    qemu_img(*args, path, str(size))
    return path


def std(compat: str, cs: int):
    def build(d: str) -> str:
        size = 8 * MiB
        p = _create(f"{d}/img.qcow2", size, f"compat={compat}", f"cluster_size={cs}")
        _fill(p, size, cs)
        return p
    return build


def refcount_bits(bits: int):
    def build(d: str) -> str:
        p = _create(f"{d}/img.qcow2", 4 * MiB, "cluster_size=4096", f"refcount_bits={bits}")
        _fill(p, 4 * MiB, 4096)
        return p
    return build


def _mixed_raw(path: str, size: int) -> None:
    rnd = random.Random(7)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 48 * 1024):
            f.seek(off)
            f.write(rnd.randbytes(3000) + bytes([off // 4096 % 251]) * 9000)


def compressed(ctype: str, cs: int):
    def build(d: str) -> str:
        _mixed_raw(f"{d}/src.raw", 4 * MiB)
        p = f"{d}/img.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", "-o",
                 f"compression_type={ctype},cluster_size={cs}", f"{d}/src.raw", p)
        qemu_io(p, "write -P 0x55 8192 4096")  # one cluster rewritten uncompressed
        return p
    return build


def preallocated_zero(d: str) -> str:
    p = _create(f"{d}/img.qcow2", 4 * MiB, "preallocation=metadata", "cluster_size=65536")
    qemu_io(p, "write -P 0x66 0 200k", "write -z 65536 65536")
    return p


def preallocated(mode: str):
    def build(d: str) -> str:
        p = _create(f"{d}/img.qcow2", 2 * MiB, f"preallocation={mode}", "cluster_size=4096")
        qemu_io(p, "write -P 0x67 4096 8192", "write -z 65536 4096")
        return p
    return build


def extended_l2(with_backing: bool):
    def build(d: str) -> str:
        backing = None
        if with_backing:
            backing = _create(f"{d}/base.qcow2", 4 * MiB)
            qemu_io(backing, "write -P 0x77 0 4M")
        p = _create(f"{d}/img.qcow2", 4 * MiB, "extended_l2=on", "cluster_size=65536",
                    backing=backing)
        qemu_io(p, "write -P 0x12 4096 4096", "write -P 0x13 70000 3000",
                "write -z 8192 4096", "write -z -u 131072 65536", "discard 196608 65536",
                "write -P 0x14 1048576 2048")
        return p
    return build


def chain(base_fmt: str, paths: str, depth: int = 8):
    """``depth`` overlays over a base; each layer writes its own pattern over a range
    overlapping the previous one. ``paths``: rel, abs or mixed backing names."""
    def build(d: str) -> str:
        size = 4 * MiB
        os.makedirs(f"{d}/sub", exist_ok=True)
        base = f"{d}/base.{base_fmt}"
        if base_fmt == "raw":
            with open(base, "wb") as f:
                f.write(bytes(range(256)) * (size // 256))
        else:
            _create(base, size, "cluster_size=4096")
            qemu_io(base, f"write -P 0xb0 0 {size}")
        prev = base
        for i in range(depth):
            # alternate directories so that relative names really are relative
            p = f"{d}/sub/l{i}.qcow2" if i % 2 else f"{d}/l{i}.qcow2"
            rel = os.path.relpath(prev, os.path.dirname(p))
            name = {"rel": rel, "abs": prev, "mixed": rel if i % 2 else prev}[paths]
            qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={4096 << (i % 3)}",
                     "-b", name, "-F", base_fmt if prev == base else "qcow2", p)
            qemu_io(p, f"write -P {0x20 + i} {i * 300 * 1024 + 512} {200 * 1024}")
            prev = p
        return prev
    return build


def short_backing(base_fmt: str):
    def build(d: str) -> str:
        base = f"{d}/base.{base_fmt}"
        if base_fmt == "raw":
            with open(base, "wb") as f:
                f.write(b"\x99" * (MiB + 4096))  # not a cluster multiple either
        else:
            _create(base, MiB)
            qemu_io(base, f"write -P 0x99 0 {MiB}")
        p = _create(f"{d}/img.qcow2", 4 * MiB, "cluster_size=65536", backing=base,
                    backing_fmt=base_fmt)
        qemu_io(p, f"write -P 0x12 {MiB - 512} 1024")  # COW across the backing's end
        return p
    return build


def snapshots(d: str) -> str:
    p = _create(f"{d}/img.qcow2", 4 * MiB, "cluster_size=4096")
    qemu_io(p, "write -P 0x01 0 1M")
    qemu_img("snapshot", "-c", "s1", p)
    qemu_io(p, "write -P 0x02 4096 8192", "discard 65536 65536")
    qemu_img("snapshot", "-c", "s2", p)
    qemu_io(p, "write -P 0x03 0 512", "write -z 131072 4096")
    return p


def committed(d: str) -> str:
    base = _create(f"{d}/base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 0x01 0 4M")
    mid = _create(f"{d}/mid.qcow2", 4 * MiB, backing="base.qcow2")
    qemu_io(mid, "write -P 0x02 1M 1M")
    top = _create(f"{d}/top.qcow2", 4 * MiB, backing="mid.qcow2")
    qemu_io(top, "write -P 0x03 1536k 1M", "write -z 3M 64k")
    qemu_img("commit", "-q", top)
    return mid


CASES = {
    **{f"v{c}-cs{cs}": std(c, cs) for c in ("0.10", "1.1")
       for cs in (512, 4096, 65536, 2 * MiB)},
    **{f"refcount{b}": refcount_bits(b) for b in (1, 2, 4, 8, 32, 64)},
    **{f"compressed-{t}-cs{cs}": compressed(t, cs) for t in ("zlib", "zstd")
       for cs in (4096, 65536)},
    "preallocated-zero": preallocated_zero,
    **{f"preallocation-{m}": preallocated(m) for m in ("falloc", "full")},
    "extended-l2": extended_l2(False),
    "extended-l2-backing": extended_l2(True),
    **{f"chain8-{fmt}-{paths}": chain(fmt, paths) for fmt in ("raw", "qcow2")
       for paths in ("rel", "abs", "mixed")},
    "short-backing-raw": short_backing("raw"),
    "short-backing-qcow2": short_backing("qcow2"),
    "snapshots": snapshots,
    "committed": committed,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_blkpy_reads_what_qemu_reads(case, tmp_path):
    path = CASES[case](str(tmp_path))
    expected = as_raw(path, str(tmp_path / "expected.raw"))
    with Qcow2Disk(path, readonly=True) as disk:
        assert disk.size == len(expected)
        assert read_all(disk) == expected
        # scattered segment lists, unaligned to clusters
        rnd = random.Random(case)
        for _ in range(20):
            nseg = rnd.randint(1, 11)
            seglen = 512 * rnd.randint(1, 8)
            off = rnd.randrange(0, (disk.size - nseg * seglen) // 512) * 512
            bufs = [bytearray(seglen) for _ in range(nseg)]
            disk.readv(off, [memoryview(b) for b in bufs])
            assert b"".join(bufs) == expected[off:off + nseg * seglen]


def test_small_cache_still_reads_correctly(tmp_path):
    path = std("1.1", 512)(str(tmp_path))
    expected = as_raw(path, str(tmp_path / "expected.raw"))
    with Qcow2Disk(path, readonly=True, cache_size=512) as disk:
        assert read_all(disk) == expected


class _ShortThenEIO:
    """os.preadv as a failing disk does it: the first call stops short after the bytes it
    could copy, the retry gets the I/O error."""

    def __init__(self) -> None:
        self.real = os.preadv
        self.calls = 0

    def __call__(self, fd: int, bufs, offset: int) -> int:  # noqa: ANN001
        self.calls += 1
        if self.calls == 1:
            return self.real(fd, [memoryview(bufs[0])[:512]], offset)
        raise OSError(5, "Input/output error")


@pytest.mark.parametrize("cached", [True, False])
def test_short_read_from_a_failing_disk_is_an_error_not_zeros(tmp_path, monkeypatch, cached):
    """A short preadv inside the file is an I/O error striking mid-way, not the end of
    the file: the read must fail (it used to return zeros for the rest, silently)."""
    path = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "1M")
    qemu_io(path, "write -P 0x5a 0 64k")
    with Qcow2Disk(path, readonly=True) as disk:
        if cached:  # tables cached: the fast path; otherwise the metadata walk
            disk.readv(0, [memoryview(bytearray(512))])
        failing = _ShortThenEIO()
        monkeypatch.setattr(os, "preadv", failing)
        buf = bytearray(8192)
        with pytest.raises(OSError):
            disk.readv(4096, [memoryview(buf)])
        assert failing.calls == 2
