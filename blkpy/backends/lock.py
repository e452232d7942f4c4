"""One writer per image file, across processes: an open-file-description (OFD) lock over the
whole file, exclusive for a writable disk and shared for a read-only one (QEMU's image
locking is the model: its own locks are shared OFD locks on bytes 100+ and 200+, so QEMU
and qemu-img refuse an image a serve holds, and a serve refuses one QEMU writes).

Why it matters: a qcow2 image keeps metadata (L2 tables, refcounts) cached in its writer and
written back on flush and close. When a guest moves to a new domain (``xl migrate ...
localhost``), libxl creates the new domain's devices while the old ones are still there:
the new serve must not read or write the image before the old one has flushed and closed it.
An OFD lock belongs to the open file, not the process, so closing another descriptor of the
same file (the disk's own) does not drop it, and it goes away when the process dies
(``kill -9``: its successor finds it free).
"""

from __future__ import annotations

import fcntl
import os
import struct
import time

from blkpy.backends.base import DiskError

#: struct flock on Linux x86-64/arm64: l_type, l_whence, l_start, l_len, l_pid (+ padding)
_FLOCK = "hhqqi4x"


class ImageBusy(DiskError):
    """Another process (a serve of another domain, QEMU) holds the image."""


class ImageLock:
    """The lock on ``path`` while this object is open; ``close`` releases it."""

    def __init__(self, path: str, write: bool) -> None:
        self.path = path
        self.write = write
        try:
            # F_WRLCK needs a descriptor open for writing
            self._fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskError(f"cannot open {path}: {exc.strerror}") from None
        self.held = False

    def try_acquire(self) -> bool:
        """Take the lock if nobody conflicts; True if it is held now."""
        if self.held:
            return True
        kind = fcntl.F_WRLCK if self.write else fcntl.F_RDLCK
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0))
        except OSError:  # EAGAIN/EACCES: held by someone else
            return False
        self.held = True
        return True

    def acquire(self, timeout: float, poll: float = 0.01) -> bool:
        """Wait up to ``timeout`` seconds for the lock (polled: the waiter stays
        interruptible and a timeout needs no signal); True if held."""
        deadline = time.monotonic() + timeout
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.held = False

    def __enter__(self) -> ImageLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lock_image(path: str, write: bool) -> ImageLock:
    """The image's lock, taken at once, or ImageBusy (the lock is then closed)."""
    lock = ImageLock(path, write)
    if not lock.try_acquire():
        lock.close()
        raise ImageBusy(f"{path} is in use by another process (locked for "
                        f"{'writing' if write else 'reading'})")
    return lock
