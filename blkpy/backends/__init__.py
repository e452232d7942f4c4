"""Image formats. ``open_disk`` is the one entry point; the format is always stated by the
caller (never guessed from the contents: a guest could write a qcow2 header into a raw disk)."""

from __future__ import annotations

from blkpy.backends.base import CorruptImage, Disk, DiskError, UnsupportedImage

FORMATS = ("raw", "qcow2")
QCOW2_MAGIC = b"QFI\xfb"


def open_disk(path: str, fmt: str, readonly: bool = False, **options: object) -> Disk:
    """Open ``path`` as ``fmt``; raises DiskError with a one-line message on bad input."""
    if fmt == "raw":
        from blkpy.backends.raw import RawDisk

        return RawDisk(path, readonly=readonly, **options)  # type: ignore[arg-type]
    if fmt == "qcow2":
        from blkpy.backends.qcow2 import Qcow2Disk

        return Qcow2Disk(path, readonly=readonly, **options)  # type: ignore[arg-type]
    raise DiskError(f"unknown image format {fmt!r} (expected one of {', '.join(FORMATS)})")


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
    "CorruptImage",
    "Disk",
    "DiskError",
    "UnsupportedImage",
    "open_disk",
    "probe_format",
]
