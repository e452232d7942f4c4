"""Helpers for tests that use qemu-img/qemu-io as the qcow2 oracle."""

from __future__ import annotations

import shutil
import subprocess

import pytest

needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="qemu-utils not installed (setup.sh installs it)")


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=check)


def qemu_io(path: str, *commands: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    r = subprocess.run([*args, path], capture_output=True, text=True, check=True)
    # qemu-io reports failed commands on stdout but still exits 0
    assert "error" not in r.stdout.lower() and "failed" not in r.stdout.lower(), r.stdout


def as_raw(path: str, out: str) -> bytes:
    """The guest contents of ``path`` as qemu-img sees them."""
    qemu_img("convert", "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


def check_clean(path: str) -> None:
    """qemu-img check must find neither corruption nor leaks."""
    r = qemu_img("check", path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def read_all(disk) -> bytes:  # noqa: ANN001 - any blkpy Disk
    buf = bytearray(disk.size)
    disk.readv(0, [memoryview(buf)])
    return bytes(buf)
