"""Virtual device names (xvda, hdc, sdb1, d0p1, 51712) to vbd device ids (xen-vbd-interface)."""

from __future__ import annotations

import re

_XVD_MAJOR, _SD_MAJOR, _HD_MAJOR_01, _HD_MAJOR_23 = 202, 8, 3, 22
_EXTENDED = 1 << 28


def _letters(text: str) -> int:
    """Bijective base-26: a=0 ... z=25, aa=26."""
    n = 0
    for ch in text:
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


def vdev_to_devid(name: str) -> int:
    """The decimal devid libxl uses in xenstore paths for vdev ``name``."""
    if re.fullmatch(r"\d+|0[xX][0-9a-fA-F]+", name):
        devid = int(name, 0)
    elif m := re.fullmatch(r"xvd([a-z]+)(0|[1-9]\d*)?", name):
        devid = _xvd(_letters(m[1]), int(m[2] or 0))
    elif m := re.fullmatch(r"d(0|[1-9]\d*)p(0|[1-9]\d*)", name):
        devid = _xvd(int(m[1]), int(m[2]))
    elif m := re.fullmatch(r"hd([a-d])(0|[1-9]\d*)?", name):
        disk, part = _letters(m[1]), int(m[2] or 0)
        if part > 63:
            raise ValueError(f"{name}: partition > 63")
        major = _HD_MAJOR_01 if disk < 2 else _HD_MAJOR_23
        devid = (major << 8) | ((disk % 2) << 6) | part
    elif m := re.fullmatch(r"sd([a-z]+)(0|[1-9]\d*)?", name):
        disk, part = _letters(m[1]), int(m[2] or 0)
        if disk > 15 or part > 15:
            raise ValueError(f"{name}: sd disks up to 15 with up to 15 partitions")
        devid = (_SD_MAJOR << 8) | (disk << 4) | part
    else:
        raise ValueError(f"{name!r} is not a virtual device name")
    if devid >= 2 << 28:
        raise ValueError(f"{name}: device number {devid} is reserved")
    return devid


def _xvd(disk: int, part: int) -> int:
    if disk <= 15 and part <= 15:
        return (_XVD_MAJOR << 8) | (disk << 4) | part
    if disk >= 1 << 20 or part > 255:
        raise ValueError(f"xvd disk {disk} partition {part} out of range")
    return _EXTENDED | (disk << 8) | part
