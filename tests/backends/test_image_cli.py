"""`blkpy image create/info/check/convert`, with qemu-img as the reference."""

from __future__ import annotations

import json
import os
import struct

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu_img import as_raw, check_clean, needs_qemu, qemu_img, qemu_io

from blkpy.backends.image_cli import parse_size
from blkpy.cli import main

pytestmark = needs_qemu


def run(*args: str):
    return CliRunner().invoke(main, ["image", *args])


def _one_clean_error(result, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit)  # not a traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blkpy image:"), result.stderr


@pytest.mark.parametrize("text,size", [("512", 512), ("4K", 4096), ("4k", 4096),
                                       ("1M", 1 << 20), ("2G", 2 << 30), ("1T", 1 << 40),
                                       ("1.5M", 3 << 19), ("100B", 100)])
def test_sizes_take_qemu_img_suffixes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("opts,expect", [
    ("", {"compat": "1.1", "refcount-bits": 16}),
    ("compat=0.10", {"compat": "0.10"}),
    ("cluster_size=512,refcount_bits=1", {"refcount-bits": 1}),
    ("cluster_size=2M,refcount_bits=64", {"refcount-bits": 64}),
    ("extended_l2=on,cluster_size=128K", {"extended-l2": True}),
    ("lazy_refcounts=on", {"lazy-refcounts": True}),
    ("compression_type=zstd", {"compression-type": "zstd"}),
])
def test_create_qcow2_options_as_qemu_img_sees_them(tmp_path, opts, expect):
    path = str(tmp_path / "new.qcow2")
    args = ["create", "-q", "-f", "qcow2", path, "1G"]
    if opts:
        args[4:4] = ["-o", opts]
    result = run(*args)
    assert result.exit_code == 0, result.output
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    assert info["virtual-size"] == 1 << 30
    data = info["format-specific"]["data"]
    for key, value in expect.items():
        assert data[key] == value
    if "cluster_size=" in opts:
        want = parse_size(opts.split("cluster_size=")[1].split(",")[0])
        assert info["cluster-size"] == want
    check_clean(path)
    qemu_io(path, "write -P 0x5 1M 200k")  # qemu can use what we made
    check_clean(path)


def test_create_with_relative_backing_takes_its_size(tmp_path):
    os.makedirs(tmp_path / "sub")
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.write(b"\x07" * (3 << 20))
    top = str(tmp_path / "sub" / "top.qcow2")
    assert run("create", "-q", "-f", "qcow2", "-b", "../base.raw", "-F", "raw", top).exit_code == 0
    info = json.loads(qemu_img("info", "--output=json", top).stdout)
    assert info["virtual-size"] == 3 << 20 and info["backing-filename"] == "../base.raw"
    assert as_raw(top, str(tmp_path / "out.raw")) == b"\x07" * (3 << 20)


def test_info_json_lists_chain_and_snapshots(tmp_path):
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "2M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_img("snapshot", "-c", "before-upgrade", top)
    result = run("info", "--json", top)
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 2 << 20
    assert [s["name"] for s in info["snapshots"]] == ["before-upgrade"]
    assert info["backing-filename-format"] == "qcow2"
    assert info["backing-image"]["cluster-size"] == 4096
    text = run("info", top).stdout
    assert "before-upgrade" in text and "backing file: base.qcow2" in text


def _refcount_offset(path: str, cluster: int) -> int:
    """File offset of a cluster's 16-bit refcount (first refcount block only)."""
    with open(path, "rb") as f:
        head = f.read(64)
        rt_offset = struct.unpack_from(">Q", head, 48)[0]
        f.seek(rt_offset)
        block = struct.unpack(">Q", f.read(8))[0]
    return block + 2 * cluster


@pytest.mark.parametrize("damage,code", [(None, 0), ("leak", 3), ("corrupt", 2)])
def test_check_exit_codes_match_qemu_img(tmp_path, damage, code):
    path = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "1M")
    qemu_io(path, "write -P 1 0 64k")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if damage == "leak":  # one more cluster, counted but unused
            f.truncate(size + 4096)
            f.seek(_refcount_offset(path, size // 4096))
            f.write(struct.pack(">H", 1))
        elif damage == "corrupt":  # the last data cluster claims to be free
            f.seek(_refcount_offset(path, size // 4096 - 1))
            f.write(struct.pack(">H", 0))
    result = run("check", path)
    assert result.exit_code == code, result.output
    assert qemu_img("check", path, check=False).returncode == code
    if code == 0:
        assert "No errors were found" in result.stdout


def test_check_of_raw_says_unsupported(tmp_path):
    path = tmp_path / "d.raw"
    path.write_bytes(bytes(4096))
    assert run("check", str(path)).exit_code == 63


@pytest.mark.parametrize("out_fmt,opts", [("raw", None), ("qcow2", None),
                                          ("qcow2", "cluster_size=4K,compat=0.10"),
                                          ("qcow2", "extended_l2=on,refcount_bits=1")])
def test_convert_preserves_contents(tmp_path, out_fmt, opts):
    base = str(tmp_path / "base.qcow2")
    src = str(tmp_path / "src.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "3M")
    qemu_io(base, "write -P 0x21 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2",
             "-F", "qcow2", src)
    qemu_io(src, "write -P 0x22 512k 100k", "write -z 700k 8k")
    dst = str(tmp_path / f"dst.{out_fmt}")
    args = ["convert", "-O", out_fmt, src, dst]
    if opts:
        args[3:3] = ["-o", opts]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # no progress bar when stdout is not a terminal
    assert qemu_img("compare", src, dst, check=False).returncode == 0
    if out_fmt == "qcow2":
        check_clean(dst)
        # zero areas stay unallocated
        assert os.path.getsize(dst) < 2 << 20


@pytest.mark.parametrize("args", [
    ["info", "missing.qcow2"],
    ["create", "-f", "qcow2", "-o", "cluster_size=3000", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "bogus=1", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "x.qcow2", "12Q"],
    ["create", "-f", "qcow2", "-o", "compat=0.10,extended_l2=on", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "-b", "missing.raw", "-F", "raw", "x.qcow2"],
    ["convert", "-O", "qcow2", "missing.raw", "out.qcow2"],
])
def test_bad_input_gives_one_line_and_status_1(tmp_path, args):
    os.chdir(tmp_path)
    _one_clean_error(run(*args))


def test_encrypted_or_corrupt_image_is_one_line(tmp_path):
    path = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    with open(path, "r+b") as f:
        f.seek(32)
        f.write(struct.pack(">I", 2))  # LUKS
    _one_clean_error(run("info", path))
    _one_clean_error(run("convert", path, str(tmp_path / "o.raw")))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(0, 120), value=st.integers(0, 255))
def test_damaged_headers_never_give_a_traceback(tmp_path, pos, value):
    path = str(tmp_path / "fuzz.qcow2")
    if not os.path.exists(str(tmp_path / "orig.qcow2")):
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                 str(tmp_path / "orig.qcow2"), "1M")
    blob = bytearray((tmp_path / "orig.qcow2").read_bytes())
    blob[pos] = value
    with open(path, "wb") as f:
        f.write(blob)
    for args in (["info", path], ["check", path], ["convert", path, path + ".raw"]):
        result = run(*args)
        assert result.exception is None or isinstance(result.exception, SystemExit), args


def test_check_counts_bitmaps_until_blkpy_writes(tmp_path):
    """Consistent persistent bitmaps own their clusters; after a write by a program that
    keeps no bitmaps (the autoclear bit cleared) QEMU and blkpy both call them leaks."""
    from blkpy.backends.qcow2 import Qcow2Disk

    path = str(tmp_path / "bm.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -P 1 0 1M")
    qemu_img("bitmap", "--add", path, "bm0")
    qemu_io(path, "write -P 2 1M 1M")
    for expected in (0, 3):
        result = run("check", path)
        qemu = qemu_img("check", path, check=False)
        assert result.exit_code == qemu.returncode == expected, result.output
        assert result.stdout.splitlines()[-1] == qemu.stdout.splitlines()[-1]  # image end
        with Qcow2Disk(path) as disk:
            disk.writev(0, [memoryview(b"x" * 4096)])


def test_convert_shows_progress_on_a_terminal(tmp_path):
    import pty
    import subprocess
    import sys

    src = tmp_path / "src.raw"
    src.write_bytes(b"\x01" * (3 << 20))
    leader, follower = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "blkpy", "image", "convert", "-O", "qcow2",
                           str(src), str(tmp_path / "dst.qcow2")],
                          stdout=follower, stderr=subprocess.PIPE, timeout=60)
    os.close(follower)
    out = b""
    try:
        while chunk := os.read(leader, 4096):
            out += chunk
    except OSError:  # EIO once the terminal's other side is closed
        pass
    os.close(leader)
    assert proc.returncode == 0, proc.stderr
    assert b"converting" in out
    assert qemu_img("compare", str(src), str(tmp_path / "dst.qcow2")).returncode == 0


def test_info_with_a_missing_backing_file_still_describes_the_image(tmp_path):
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", top, "1M")
    result = run("info", "--json", top)
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["virtual-size"] == 1 << 20 and "gone.qcow2" in info["backing-error"]
