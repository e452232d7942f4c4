"""Ceph RBD images as disks, through librbd's C API (bound in ``blkpy.backends.librbd``).

Target (the xl target, which libxl copies into ``params``; the ``rbd:`` scheme included)::

    rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:conf=PATH][:id=NAME][:lock=exclusive][:OPTION=VALUE...]

``conf`` is the ceph.conf to read (default: librados's search path, CEPH_CONF first), ``id``
the client name without ``client.`` (default ``admin``); any other OPTION=VALUE is a Ceph
option set on the client (``mon_host``, ``keyring``, ``rbd_cache``..., QEMU's rbd syntax),
and ``\\`` escapes a ``:``, ``@`` or ``/`` in a value or name. ``@SNAP`` opens the
snapshot, which is always read-only whatever the device's mode. ``lock=exclusive`` takes
librbd's exclusive lock at open and keeps it: another client holding it fails the open,
and no other client can write while this one serves (README: exclusive lock).

No copy in blkpy: reads and writes are ``rbd_aio_readv``/``rbd_aio_writev`` on the
iovecs of the mapped guest pages (librbd itself copies a write into its own buffer,
``rbd_disable_zero_copy_writes``: its cache may keep the data after the guest has its
answer and reuses the page). The data path is in C (``blkpy/backends/rbdio.c``), behind
the disk queues the native ring loop and the Python engine drive alike
(``blkpy.backends.diskqueue``): each op's completion calls back into C on a librbd thread,
which posts it to the queue that sent it and signals that queue's eventfd, so no Python
runs per request and the rings sharing an image never see each other's completions. A
discard is ``rbd_aio_write_zeroes`` (Disk.discard promises zeros: librbd's plain discard
skips the parts of a range that do not cover its discard granularity), which still frees
the objects it covers whole.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import re
from collections.abc import Sequence

from blkpy.backends.base import Disk, DiskError
from blkpy.backends.diskqueue import DiskQueue, QueueEngine
from blkpy.backends.librbd import FEATURE_EXCLUSIVE_LOCK, Libs, ffi, load, strerror
from blkpy.engine import IoEngine, SyncEngine
from blkpy.gntdev import native

log = logging.getLogger("blkpy.rbd")

SYNTAX = "rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:conf=PATH][:id=NAME][:lock=exclusive][:OPTION=VALUE...]"
#: How long opening waits for a monitor: librados's own default (client_mount_timeout) is
#: 300 s, far past what a toolstack waits for a backend. A conf file or the target may set
#: it otherwise.
CONNECT_TIMEOUT_S = 10
#: Discard granularity advertised to the guest: a write-zeroes is exact at any size, so the
#: page, as for raw files (librbd frees the objects a range covers whole, and trims the
#: tail of the others)
DISCARD_GRANULARITY = 4096
_OPTION_NAME = re.compile(r"[A-Za-z0-9_ -]+")


@dataclasses.dataclass(frozen=True)
class RbdTarget:
    pool: str
    image: str
    namespace: str = ""
    snap: str | None = None
    conf: str | None = None
    client_id: str = "admin"
    exclusive: bool = False
    options: tuple[tuple[str, str], ...] = ()

    @property
    def spec(self) -> str:
        """POOL/[NAMESPACE/]IMAGE[@SNAP], as the rbd tool spells it."""
        ns = f"{self.namespace}/" if self.namespace else ""
        snap = f"@{self.snap}" if self.snap is not None else ""
        return f"{self.pool}/{ns}{self.image}{snap}"


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _escaped_split(text: str, sep: str) -> list[str]:
    """Split on the ``sep`` not escaped with a backslash, keeping the escapes (for a
    later split on another separator)."""
    parts, start, k = [], 0, 0
    while k < len(text):
        if text[k] == "\\":
            if k + 1 == len(text):
                raise ValueError("a backslash ends it")
            k += 2
            continue
        if text[k] == sep:
            parts.append(text[start:k])
            start = k + 1
        k += 1
    parts.append(text[start:])
    return parts


def parse_target(target: str) -> RbdTarget:
    """Parse ``rbd:...`` (see the module's docstring); DiskError with one line if bad."""
    def bad(why: str) -> DiskError:
        return DiskError(f"bad RBD target {target!r}: {why} (expected {SYNTAX})")

    scheme, sep, rest = target.partition(":")
    if scheme != "rbd" or not sep:
        raise bad("it does not start with rbd:")
    if "\0" in target:
        raise bad("it contains a NUL byte")
    try:
        fields = _escaped_split(rest, ":")
        head = _escaped_split(fields[0], "@")
        if len(head) > 2:
            raise bad("more than one @")
        names = [_unescape(p) for p in _escaped_split(head[0], "/")]
        snap = _unescape(head[1]) if len(head) == 2 else None
        opts = [_unescape(f) for f in fields[1:]]
    except ValueError as exc:
        raise bad(str(exc)) from None
    if len(names) not in (2, 3) or not all(names):
        raise bad("the image must be POOL/IMAGE or POOL/NAMESPACE/IMAGE")
    if snap == "":
        raise bad("empty snapshot name after @")
    values: dict[str, str] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or not _OPTION_NAME.fullmatch(key):
            raise bad(f"option {opt!r} is not KEY=VALUE")
        if key in values:
            raise bad(f"option {key} given twice")
        values[key] = value
    conf = values.pop("conf", None)
    client_id = values.pop("id", "admin")
    lock = values.pop("lock", "auto")
    if lock not in ("auto", "exclusive"):
        raise bad(f"lock={lock} (auto or exclusive)")
    if conf == "" or client_id == "":
        raise bad("conf= and id= need a value")
    return RbdTarget(pool=names[0], image=names[-1],
                     namespace=names[1] if len(names) == 3 else "", snap=snap, conf=conf,
                     client_id=client_id, exclusive=lock == "exclusive",
                     options=tuple(values.items()))


class RbdDisk(Disk):
    """One open RBD image (or snapshot). Each ring's engine and native loop has a queue
    of its own on it (``queue``); the synchronous calls serve the image tools and the
    sync/thread engines."""

    def __init__(self, target: str, readonly: bool = False) -> None:
        self.target = parse_target(target)
        self._libs: Libs = load()
        # a snapshot is read-only whatever the device's mode: never ask librbd to write it
        self.readonly = readonly or self.target.snap is not None
        self._cluster = self._ioctx = self._image = ffi.NULL
        self._native = native.ffi.NULL
        self._closed = False
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        self.can_discard = not self.readonly
        self.discard_granularity = DISCARD_GRANULARITY
        self._open_native()

    # ---- opening --------------------------------------------------------------------

    def _fail(self, what: str, ret: int) -> DiskError:
        return DiskError(f"rbd: {what}: {strerror(ret)}")

    def _open(self) -> None:
        t, rados, rbd = self.target, self._libs.rados, self._libs.rbd
        cluster = ffi.new("rados_t *")
        ret = rados.rados_create2(cluster, b"ceph", f"client.{t.client_id}".encode(), 0)
        if ret < 0:
            raise self._fail(f"cannot create a Ceph client named client.{t.client_id}", ret)
        self._cluster = cluster[0]
        # before the conf file and the target's options, which may override it
        rados.rados_conf_set(self._cluster, b"client_mount_timeout",
                             str(CONNECT_TIMEOUT_S).encode())
        if t.conf is not None:
            ret = rados.rados_conf_read_file(self._cluster, t.conf.encode())
            if ret < 0:
                raise self._fail(f"cannot read Ceph configuration {t.conf}", ret)
        elif rados.rados_conf_read_file(self._cluster, ffi.NULL) < 0 and not any(
                re.sub("[ -]", "_", key) in ("mon_host", "mon_dns_srv_name")
                for key, _ in t.options):
            # nothing says where the monitors are: librados would look them up in DNS and
            # print its own lines before failing with ENOENT
            raise DiskError("rbd: no Ceph configuration: the target has no conf= or "
                            "mon_host=, and librados found none (CEPH_CONF, "
                            "/etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf)")
        for key, value in t.options:
            ret = rados.rados_conf_set(self._cluster, key.encode(), value.encode())
            if ret == -errno.ENOENT:
                raise DiskError(f"rbd: unknown Ceph option {key!r} in the target")
            if ret < 0:
                raise self._fail(f"Ceph option {key}={value!r}", ret)
        ret = rados.rados_connect(self._cluster)
        if ret < 0:
            where = f" (configuration {t.conf})" if t.conf else ""
            raise self._fail(f"cannot connect to the Ceph cluster{where}", ret)
        ioctx = ffi.new("rados_ioctx_t *")
        ret = rados.rados_ioctx_create(self._cluster, t.pool.encode(), ioctx)
        if ret == -errno.ENOENT:
            raise DiskError(f"rbd: no pool {t.pool!r} in the Ceph cluster")
        if ret < 0:
            raise self._fail(f"cannot open pool {t.pool!r}", ret)
        self._ioctx = ioctx[0]
        if t.namespace:
            rados.rados_ioctx_set_namespace(self._ioctx, t.namespace.encode())
        self._open_image()
        size = ffi.new("uint64_t *")
        ret = rbd.rbd_get_size(self._image, size)
        if ret < 0:
            raise self._fail(f"cannot read the size of {t.spec}", ret)
        self.size = size[0] - size[0] % self.sector_size
        if t.exclusive:
            self._acquire_lock()

    def _open_image(self) -> None:
        t, rbd = self.target, self._libs.rbd
        image = ffi.new("rbd_image_t *")
        snap = t.snap.encode() if t.snap is not None else ffi.NULL
        opener = rbd.rbd_open_read_only if self.readonly else rbd.rbd_open
        ret = opener(self._ioctx, t.image.encode(), image, snap)
        # which is missing, the image or its snapshot?
        if ret == -errno.ENOENT and t.snap is not None and \
                rbd.rbd_open_read_only(self._ioctx, t.image.encode(), image, ffi.NULL) == 0:
            rbd.rbd_close(image[0])
            raise DiskError(f"rbd: image {t.spec.partition('@')[0]} has no snapshot "
                            f"{t.snap!r}")
        if ret == -errno.ENOENT:
            raise DiskError(f"rbd: no image {t.spec.partition('@')[0]!r}")
        if ret < 0:
            raise self._fail(f"cannot open {t.spec}", ret)
        self._image = image[0]

    def _open_native(self) -> None:
        """The C data path on the image; without it (a build without librbd's headers)
        the disk serves through the synchronous calls, and says so."""
        msg = native.ffi.new("char[256]")
        image = native.ffi.cast("void *", int(ffi.cast("uintptr_t", self._image)))
        self._native = native.lib.blkpy_rbd_new(image, int(self.readonly), self.size, msg,
                                                len(msg))
        if self._native == native.ffi.NULL:
            log.warning("rbd: %s: no asynchronous I/O, every request is synchronous: %s",
                        self.target.spec, native.ffi.string(msg).decode(errors="replace"))

    def _acquire_lock(self) -> None:
        t, rbd = self.target, self._libs.rbd
        if self.readonly:
            raise DiskError("rbd: lock=exclusive is for a writable device (this one is "
                            "read-only)")
        features = ffi.new("uint64_t *")
        rbd.rbd_get_features(self._image, features)
        if not features[0] & FEATURE_EXCLUSIVE_LOCK:
            raise DiskError(f"rbd: lock=exclusive needs the exclusive-lock feature, which "
                            f"{t.spec} does not have")
        ret = rbd.rbd_lock_acquire(self._image, 0)  # RBD_LOCK_MODE_EXCLUSIVE
        if ret == -errno.EROFS:
            raise DiskError(f"rbd: {t.spec} is locked by another client (lock=exclusive)")
        if ret < 0:
            raise self._fail(f"cannot take the exclusive lock of {t.spec}", ret)

    # ---- Disk ----------------------------------------------------------------------

    def refresh_size(self) -> int:
        size = ffi.new("uint64_t *")
        ret = self._libs.rbd.rbd_get_size(self._image, size)
        if ret < 0:
            raise OSError(-ret, strerror(ret))
        self.size = size[0] - size[0] % self.sector_size
        if self._native != native.ffi.NULL:
            native.lib.blkpy_rbd_set_size(self._native, self.size)
        return self.size

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Blocking reads (the sync and thread engines); the queues are the fast path."""
        self.check_range(offset, sum(len(b) for b in bufs))
        for buf in bufs:
            n = len(buf)
            ptr = ffi.from_buffer(buf, require_writable=True)
            ret = self._libs.rbd.rbd_read2(self._image, offset, n, ptr, 0)
            if ret < 0:
                raise OSError(-ret, strerror(ret))
            if ret < n:  # past the end of an image shrunk under us: zeros
                ffi.memmove(ptr + ret, bytes(n - ret), n - ret)
            offset += n

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        if self.readonly:
            raise PermissionError(errno.EROFS, "disk is read-only")
        self.check_range(offset, sum(len(b) for b in bufs))
        for buf in bufs:
            ret = self._libs.rbd.rbd_write2(self._image, offset, len(buf),
                                            ffi.from_buffer(buf), 0)
            if ret < 0:
                raise OSError(-ret, strerror(ret))
            offset += len(buf)

    def flush(self) -> None:
        if not self.readonly:
            ret = self._libs.rbd.rbd_flush(self._image)
            if ret < 0:
                raise OSError(-ret, strerror(ret))

    def discard(self, offset: int, length: int) -> None:
        if self.readonly:
            raise PermissionError(errno.EROFS, "disk is read-only")
        self.check_range(offset, length)
        if length:
            ret = self._libs.rbd.rbd_write_zeroes(self._image, offset, length, 0, 0)
            if ret < 0:
                raise OSError(-ret, strerror(ret))

    def queue(self) -> DiskQueue:
        """A queue of its own on the image (one per ring's engine and loop)."""
        return DiskQueue(native.lib.blkpy_rbd_queue_new(self._native), "an RBD queue")

    def engine(self) -> IoEngine:
        """The I/O engine ``--engine auto`` uses (blkpy.engine.make_engine)."""
        return QueueEngine(self, self.queue()) if self._native else SyncEngine(self)

    def loop_queue(self) -> DiskQueue | None:
        # The ring loop sends reads, writes, flushes and discards (zeroing the range)
        # itself and answers each as it completes; the Python engine keeps what it leaves.
        return self.queue() if self._native else None

    def close(self) -> None:
        """Close the image (librbd writes its cache back and releases the exclusive lock),
        then the pool and the cluster connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        rados, rbd = self._libs.rados, self._libs.rbd
        if self._native != native.ffi.NULL:  # its queues are gone: nothing in flight
            native.lib.blkpy_rbd_free(self._native)
            self._native = native.ffi.NULL
        if self._image != ffi.NULL:
            ret = rbd.rbd_close(self._image)
            if ret < 0:
                log.error("rbd: closing %s: %s", self.target.spec, strerror(ret))
            self._image = ffi.NULL
        if self._ioctx != ffi.NULL:
            rados.rados_ioctx_destroy(self._ioctx)
            self._ioctx = ffi.NULL
        if self._cluster != ffi.NULL:
            rados.rados_shutdown(self._cluster)
            self._cluster = ffi.NULL

    # ---- locks ------------------------------------------------------------------------

    def is_lock_owner(self) -> bool:
        owner = ffi.new("int *")
        ret = self._libs.rbd.rbd_is_exclusive_lock_owner(self._image, owner)
        if ret < 0:
            raise OSError(-ret, strerror(ret))
        return bool(owner[0])
