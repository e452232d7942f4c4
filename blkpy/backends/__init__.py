"""Image formats. ``open_disk`` is the one entry point; the format is always stated by the
caller (never guessed from the contents: a guest could write a qcow2 header into a raw disk)."""

from __future__ import annotations

import contextlib
import importlib

from blkpy.backends.base import CorruptImage, Disk, DiskError, UnsupportedImage

FORMATS = ("raw", "qcow2")
#: disks reached over the network: their "path" is the whole target (scheme included)
NETWORK_FORMATS = ("nbd", "rbd")
QCOW2_MAGIC = b"QFI\xfb"


def open_disk(path: str, fmt: str, readonly: bool = False, **options: object) -> Disk:
    """Open ``path`` as ``fmt``; raises DiskError with a one-line message on bad input."""
    if fmt == "raw":
        from blkpy.backends.raw import RawDisk

        return RawDisk(path, readonly=readonly, **options)  # type: ignore[arg-type]
    if fmt == "qcow2":
        from blkpy.backends.qcow2 import Qcow2Disk

        return Qcow2Disk(path, readonly=readonly, **options)  # type: ignore[arg-type]
    if fmt == "nbd":
        from blkpy.backends.nbd import NbdDisk

        return NbdDisk(path, readonly=readonly)
    if fmt == "rbd":
        from blkpy.backends.rbd import RbdDisk

        return RbdDisk(path, readonly=readonly)
    raise DiskError(f"unknown image format {fmt!r} "
                    f"(expected one of {', '.join(FORMATS + NETWORK_FORMATS)})")


def load_format(fmt: str) -> None:
    """Import ``fmt``'s implementation now, without opening anything: a serve that takes a
    device over imports it before the guest waits for it (under emulation an import costs
    seconds). An implementation that cannot load is left for ``open_disk`` to report."""
    modules = {"raw": "blkpy.backends.raw", "qcow2": "blkpy.backends.qcow2",
               "nbd": "blkpy.backends.nbd", "rbd": "blkpy.backends.rbd"}
    if fmt in modules:
        with contextlib.suppress(ImportError):
            importlib.import_module(modules[fmt])


def network_format(target: str) -> str | None:
    """The network disk format a target names by its scheme (``nbd:...``, ``nbd+unix://``,
    ``nbds://``...), or None for a file."""
    scheme = target.partition(":")[0]
    if scheme.split("+")[0] in ("nbd", "nbds") and ":" in target:
        return "nbd"
    if scheme == "rbd" and ":" in target:
        return "rbd"
    return None


def check_target(target: str, fmt: str) -> None:
    """Raise DiskError (one line) unless a network target parses, without connecting."""
    if fmt == "nbd":
        from blkpy.backends.nbd import parse_target

        parse_target(target)
    elif fmt == "rbd":
        from blkpy.backends.rbd import parse_target as parse_rbd_target

        parse_rbd_target(target)


def probe_format(path: str) -> str:
    """Guess a format from the header. Only for the operator's own files (``sim run``,
    ``image info``); ``serve`` never calls this."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise DiskError(f"cannot open {path}: {exc.strerror}") from None
    return "qcow2" if magic == QCOW2_MAGIC else "raw"


__all__ = [
    "FORMATS",
    "NETWORK_FORMATS",
    "CorruptImage",
    "Disk",
    "DiskError",
    "UnsupportedImage",
    "check_target",
    "load_format",
    "network_format",
    "open_disk",
    "probe_format",
]
