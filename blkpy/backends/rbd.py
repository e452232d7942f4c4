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
answer and reuses the page). Completions come back without any Python callback
thread: librbd queues them and signals an eventfd (``rbd_set_image_notification``), and
the ring thread that sleeps on that fd collects them with ``rbd_poll_io_events``. A
discard is ``rbd_aio_write_zeroes`` (Disk.discard promises zeros: librbd's plain discard
skips the parts of a range that do not cover its discard granularity), which still frees
the objects it covers whole.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import logging
import os
import re
import select
import threading
from collections.abc import Sequence
from typing import NamedTuple

from blkpy import engine as io
from blkpy.backends.base import Disk, DiskError
from blkpy.backends.librbd import (
    EVENT_TYPE_EVENTFD,
    FEATURE_EXCLUSIVE_LOCK,
    Libs,
    ffi,
    load,
    strerror,
)
from blkpy.engine import IoEngine, IoVector

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
_REAP_MAX = 64
_IOVEC_SIZE = 16


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
    """One open RBD image (or snapshot). The ring threads' engines share it: librbd
    signals one eventfd per image, so completions are collected under a lock and handed
    to the engine that submitted them (``_reap``)."""

    def __init__(self, target: str, readonly: bool = False) -> None:
        self.target = parse_target(target)
        self._libs: Libs = load()
        # a snapshot is read-only whatever the device's mode: never ask librbd to write it
        self.readonly = readonly or self.target.snap is not None
        self._cluster = self._ioctx = self._image = ffi.NULL
        self._efd = -1
        self._lock = threading.Lock()
        self._engines: dict[int, RbdEngine] = {}
        self._next_engine = 0
        self._comps = ffi.new(f"rbd_completion_t[{_REAP_MAX}]")
        self._closed = False
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        self.can_discard = not self.readonly
        self.discard_granularity = DISCARD_GRANULARITY

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
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        ret = rbd.rbd_set_image_notification(self._image, efd, EVENT_TYPE_EVENTFD)
        if ret < 0:
            os.close(efd)
            raise self._fail("cannot set up completion notification", ret)
        self._efd = efd

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
        return self.size

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Blocking reads (the sync and thread engines); RbdEngine is the fast path."""
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

    def engine(self) -> RbdEngine:
        """The I/O engine ``--engine auto`` uses (blkpy.engine.make_engine)."""
        return RbdEngine(self)

    def close(self) -> None:
        """Close the image (librbd writes its cache back and releases the exclusive lock),
        then the pool and the cluster connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        rados, rbd = self._libs.rados, self._libs.rbd
        if self._image != ffi.NULL:
            ret = rbd.rbd_close(self._image)
            if ret < 0:
                log.error("rbd: closing %s: %s", self.target.spec, strerror(ret))
            self._image = ffi.NULL
        if self._efd >= 0:  # librbd may signal it until the image is closed
            os.close(self._efd)
            self._efd = -1
        if self._ioctx != ffi.NULL:
            rados.rados_ioctx_destroy(self._ioctx)
            self._ioctx = ffi.NULL
        if self._cluster != ffi.NULL:
            rados.rados_shutdown(self._cluster)
            self._cluster = ffi.NULL

    # ---- the engines' side -----------------------------------------------------------

    @property
    def event_fd(self) -> int:
        return self._efd

    def is_lock_owner(self) -> bool:
        owner = ffi.new("int *")
        ret = self._libs.rbd.rbd_is_exclusive_lock_owner(self._image, owner)
        if ret < 0:
            raise OSError(-ret, strerror(ret))
        return bool(owner[0])

    def _register(self, eng: RbdEngine) -> int:
        with self._lock:
            eid = self._next_engine
            self._next_engine += 1
            self._engines[eid] = eng
            return eid

    def _unregister(self, eid: int) -> None:
        with self._lock:
            self._engines.pop(eid, None)

    def _reap(self, caller: RbdEngine) -> None:
        """Collect every completion librbd has queued and hand each to its engine; wake
        the other engines that got some (they may be asleep on their own eventfd). The
        image's eventfd is read before polling, so a completion queued after the poll
        signals it again: none is left behind unsignalled."""
        rbd, comps = self._libs.rbd, self._comps
        others: set[RbdEngine] = set()
        with self._lock:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._efd)
            while True:
                n = rbd.rbd_poll_io_events(self._image, comps, _REAP_MAX)
                for i in range(max(n, 0)):
                    comp = comps[i]
                    tag = int(ffi.cast("uintptr_t", rbd.rbd_aio_get_arg(comp)))
                    ret = rbd.rbd_aio_get_return_value(comp)
                    rbd.rbd_aio_release(comp)
                    eng = self._engines.get(tag >> 32)
                    if eng is None:  # never: an engine drains before it unregisters
                        log.error("rbd: completion for a closed engine dropped")
                        continue
                    eng.inbox.append((tag & 0xFFFFFFFF, ret))
                    if eng is not caller:
                        others.add(eng)
                if n < _REAP_MAX:
                    break
            # under the lock: an engine closes its eventfd only after it unregistered
            for eng in others:
                eng.signal()


class _Op(NamedTuple):
    """One entry of a submitted vector, in plain numbers."""

    vec: IoVector
    k: int
    kind: int
    offset: int
    length: int
    iov: int  # address of its first struct iovec
    iov_count: int


class RbdEngine(IoEngine):
    """Asynchronous librbd I/O for one ring. Entries of a vector go to librbd as soon as
    they are submitted and complete in any order; a FLUSH or DISCARD waits until every
    entry before it has completed, and nothing after it starts before it completes (what
    IOSQE_IO_DRAIN gives the io_uring engine: barriers and flushes stay ordered).

    ``fileno()`` is an epoll fd over the image's eventfd and this engine's own: the ring
    loop sleeps on it and wakes when librbd completes something, or when another ring's
    engine collected completions for this one."""

    def __init__(self, disk: RbdDisk) -> None:
        super().__init__(disk)
        self.rbd_disk = disk
        self._rbd = disk._libs.rbd
        self._own_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(disk.event_fd, select.EPOLLIN)
        self._epoll.register(self._own_efd, select.EPOLLIN)
        self._id = disk._register(self)
        #: (serial, return value) of this engine's completions, filled under the disk's lock
        self.inbox: collections.deque[tuple[int, int]] = collections.deque()
        self._backlog: collections.deque[_Op] = collections.deque()
        self._started: dict[int, _Op] = {}
        self._serial = 0
        self._ordered = False  # a FLUSH/DISCARD is in librbd: nothing passes it
        self._vectors = 0
        self._done: list[IoVector] = []
        self._comp = ffi.new("rbd_completion_t *")
        self._closed = False

    def fileno(self) -> int | None:
        return self._epoll.fileno()

    def signal(self) -> None:
        os.eventfd_write(self._own_efd, 1)

    @property
    def in_flight(self) -> int:
        return self._vectors

    def submit(self, vec: IoVector) -> None:
        self._vectors += 1
        if not len(vec):
            self._done.append(vec)
            return
        # plain Python numbers once per vector: numpy scalars cost more per entry
        iov = vec.iov.ctypes.data
        entries = zip(vec.kind.tolist(), vec.offset.tolist(), vec.length.tolist(),
                      vec.iov_first.tolist(), vec.iov_count.tolist(), strict=True)
        self._backlog.extend(_Op(vec, k, kind, off, n, iov + first * _IOVEC_SIZE, count)
                             for k, (kind, off, n, first, count) in enumerate(entries))
        self._pump()

    def _pump(self) -> None:
        backlog = self._backlog
        while backlog and not self._ordered:
            op = backlog[0]
            ordered = op.kind >= io.FLUSH
            if ordered and self._started:
                return  # after everything before it has completed
            backlog.popleft()
            ret = self._start(op)
            if ret <= 0:
                op.vec.result[op.k] = ret
                self._entry_done(op.vec)
            else:
                self._ordered = ordered

    def _start(self, op: _Op) -> int:
        """Hand one entry to librbd: 1 if started, else its result (0 or -errno)."""
        disk, rbd, kind = self.rbd_disk, self._rbd, op.kind
        if kind != io.READ and disk.readonly:
            # the dispatcher refuses writes to a read-only device; a snapshot is
            # read-only for librbd too: never reach it with one
            return 0 if kind == io.FLUSH else -errno.EROFS
        serial = self._serial
        self._serial = (serial + 1) & 0xFFFFFFFF
        ret = rbd.rbd_aio_create_completion(ffi.cast("void *", (self._id << 32) | serial),
                                            ffi.NULL, self._comp)
        if ret < 0:
            return ret
        comp = self._comp[0]
        image = disk._image
        if kind <= io.WRITE:
            call = rbd.rbd_aio_readv if kind == io.READ else rbd.rbd_aio_writev
            ret = call(image, ffi.cast("const struct iovec *", op.iov), op.iov_count,
                       op.offset, comp)
        elif kind == io.FLUSH:
            ret = rbd.rbd_aio_flush(image, comp)
        else:
            ret = rbd.rbd_aio_write_zeroes(image, op.offset, op.length, comp, 0, 0)
        if ret < 0:
            rbd.rbd_aio_release(comp)
            return ret
        self._started[serial] = op
        return 1

    def _entry_done(self, vec: IoVector) -> None:
        vec.pending -= 1
        if vec.pending <= 0:
            vec.pending = 0
            self._done.append(vec)

    def _collect(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._own_efd)
        # always: the image's eventfd may have been signalled for completions an earlier
        # reap already took, and left readable it would keep the ring loop from sleeping
        self.rbd_disk._reap(self)
        inbox = self.inbox
        while inbox:
            serial, ret = inbox.popleft()
            op = self._started.pop(serial, None)
            if op is None:  # never: librbd completes each request once
                log.error("rbd: completion of an unknown request ignored")
                continue
            if op.kind >= io.FLUSH:
                self._ordered = False
            if ret < 0:
                op.vec.result[op.k] = ret
            elif op.kind == io.READ and ret < op.length:
                # past the end of an image shrunk under us: the rest reads as zeros
                first = int(op.vec.iov_first[op.k])
                io._zero_tail(op.vec.iov[first : first + op.iov_count], ret)
            self._entry_done(op.vec)
        self._pump()

    def completions(self) -> list[IoVector]:
        self._collect()
        done, self._done = self._done, []
        self._vectors -= len(done)
        return done

    def wait(self, timeout: float | None = None) -> list[IoVector]:
        if not self._done and self._started:
            self._epoll.poll(-1 if timeout is None else timeout)
        return self.completions()

    def close(self) -> None:
        """Wait for everything submitted (librbd has no cancel), then leave the disk."""
        if self._closed:
            return
        while self._backlog or self._started:
            self.wait(1.0)
        self._closed = True
        self.rbd_disk._unregister(self._id)
        self._epoll.close()
        os.close(self._own_efd)
