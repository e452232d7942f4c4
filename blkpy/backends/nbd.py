"""NBD exports as disks: qemu-nbd, nbdkit or any NBD server, through libnbd.

libnbd's C API is used through blkpy's native module (``blkpy/backends/nbdio.c``), not
its Python binding: the C API reads and writes straight into the mapped guest pages with no
Python object per request, and one C thread per connection drives libnbd's state machine,
so completions arrive on an eventfd the ring thread already sleeps on (a disk queue,
``blkpy.backends.diskqueue``: the ring loop's and the engine's) and
no request ever waits for the network on the ring thread. The same thread reconnects when
the connection drops and re-issues what was in flight.

Targets (the text after the ``nbd:`` prefix of the xl target, or a whole NBD URI):

- ``nbd:unix:SOCKET[:exportname=NAME][:OPTION=VALUE...]``
- ``nbd:HOST:PORT[:exportname=NAME][:OPTION=VALUE...]``
- ``nbd+unix:///NAME?socket=SOCKET[&OPTION=VALUE...]``, ``nbd://HOST[:PORT]/NAME[?...]``
  and the TLS forms ``nbds+unix://`` and ``nbds://`` (libnbd's URI syntax)

OPTION is ``tls-psk-file`` or ``tls-certificates`` (either makes TLS required; libnbd's own
URI parameters), ``reconnect-delay`` or ``request-timeout`` (seconds; blkpy's).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import threading
import urllib.parse
from collections.abc import Sequence

import numpy as np

from blkpy import engine as io
from blkpy.backends.base import Disk, DiskError
from blkpy.backends.diskqueue import OP_DTYPE, TRIM, DiskQueue, QueueEngine
from blkpy.gntdev.native import ffi, lib

log = logging.getLogger("blkpy.nbd")

#: How long requests wait for a dropped connection to come back before they fail (and
#: new ones fail at once until it is back). QEMU's NBD client calls this reconnect-delay
#: and defaults to 0; a guest's request simply waits, and 30 s covers a server restart or
#: a failover while staying below the guest kernel's 120 s hung-task warning.
DEFAULT_RECONNECT_DELAY_S = 30.0
#: A connection whose server has held requests this long without any reply is dropped and
#: they are retried on a new one (a stopped server, a network dropping packets without a
#: reset: libnbd itself never gives up). Far above any sane request's time.
DEFAULT_REQUEST_TIMEOUT_S = 60.0
MAX_SECONDS = 3600.0
#: A server that accepts the connection but never finishes the handshake.
CONNECT_TIMEOUT_S = 10.0
URI_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")
TLS_OPTIONS = ("tls-psk-file", "tls-certificates")
BLKPY_OPTIONS = ("reconnect-delay", "request-timeout")

_STATES = {0: "connected", 1: "reconnecting", 2: "reconnecting, requests failing"}


@dataclasses.dataclass(frozen=True)
class NbdTarget:
    """A parsed target: the URI libnbd connects to, and blkpy's own options."""

    uri: str
    reconnect_delay: float = DEFAULT_RECONNECT_DELAY_S
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S  # 0: none


def _bad(target: str, why: str) -> DiskError:
    return DiskError(f"bad NBD target {target!r}: {why}")


def _seconds(target: str, options: dict[str, str], name: str, default: float) -> float:
    """Option ``name`` (removed from ``options``) as seconds from 0 to MAX_SECONDS."""
    value = options.pop(name, None)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= MAX_SECONDS:  # NaN fails too
        raise _bad(target, f"{name}={value!r} is not a number of seconds from 0 to "
                           f"{MAX_SECONDS:g}")
    return seconds


def _timeouts(target: str, options: dict[str, str]) -> dict[str, float]:
    return {
        "reconnect_delay": _seconds(target, options, "reconnect-delay",
                                    DEFAULT_RECONNECT_DELAY_S),
        "request_timeout": _seconds(target, options, "request-timeout",
                                    DEFAULT_REQUEST_TIMEOUT_S),
    }


def parse_target(target: str) -> NbdTarget:
    """``target`` (with its ``nbd:`` prefix, or a URI) as an NbdTarget; DiskError with one
    line saying what is wrong otherwise."""
    scheme = target.partition(":")[0]
    if scheme in URI_SCHEMES and target[len(scheme):].startswith("://"):
        return _parse_uri(target)
    if scheme != "nbd":
        raise _bad(target, f"expected nbd:unix:SOCKET, nbd:HOST:PORT or a URI "
                           f"({', '.join(s + '://' for s in URI_SCHEMES)})")
    return _parse_legacy(target)


def _parse_legacy(target: str) -> NbdTarget:
    """QEMU's ``nbd:unix:SOCKET[:exportname=X]`` and ``nbd:HOST:PORT[:exportname=X]``."""
    fields = target.split(":")[1:]
    if fields[:1] == ["unix"]:
        if len(fields) < 2 or not fields[1]:
            raise _bad(target, "nbd:unix: needs a socket path")
        place, rest = {"socket": fields[1]}, fields[2:]
        if not fields[1].startswith("/"):
            raise _bad(target, "the socket path must be absolute")
    else:
        if len(fields) < 2 or not fields[0] or not fields[1]:
            raise _bad(target, "expected nbd:HOST:PORT or nbd:unix:SOCKET")
        if not (fields[1].isascii() and fields[1].isdigit() and 0 < int(fields[1]) < 65536):
            raise _bad(target, f"port {fields[1]!r} is not a number from 1 to 65535")
        place, rest = {"host": fields[0], "port": fields[1]}, fields[2:]
    options: dict[str, str] = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or key not in ("exportname", *TLS_OPTIONS, *BLKPY_OPTIONS):
            raise _bad(target, f"unknown option {item!r} (exportname=, tls-psk-file=, "
                               f"tls-certificates=, reconnect-delay=, request-timeout=)")
        if key in options:
            raise _bad(target, f"option {key} given twice")
        options[key] = value
    timeouts = _timeouts(target, options)
    export = urllib.parse.quote(options.pop("exportname", ""), safe="")
    tls = "s" if options else ""
    if "socket" in place:
        query = {"socket": place["socket"], **options}
        uri = f"nbd{tls}+unix:///{export}?{_query(query)}"
    else:
        host = place["host"]
        if ":" in host:  # an IPv6 address needs the URI's brackets
            host = f"[{host}]"
        uri = f"nbd{tls}://{host}:{place['port']}/{export}"
        if options:
            uri += f"?{_query(options)}"
    return NbdTarget(uri, **timeouts)


def _query(params: dict[str, str]) -> str:
    return urllib.parse.urlencode(params, quote_via=urllib.parse.quote, safe="/")


def _parse_uri(target: str) -> NbdTarget:
    try:
        parts = urllib.parse.urlsplit(target)
        port = parts.port
        params = urllib.parse.parse_qsl(parts.query, keep_blank_values=True,
                                        strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise _bad(target, str(exc)) from None
    known = ("socket", *TLS_OPTIONS, *BLKPY_OPTIONS)
    options: dict[str, str] = {}
    for key, value in params:
        if key not in known:
            raise _bad(target, f"unknown URI parameter {key!r} ({', '.join(known)})")
        if key in options:
            raise _bad(target, f"URI parameter {key} given twice")
        options[key] = value
    if parts.fragment:
        raise _bad(target, "an NBD URI has no #fragment")
    timeouts = _timeouts(target, options)
    if parts.scheme.endswith("+unix"):
        if parts.netloc.rpartition("@")[2]:
            raise _bad(target, "a +unix URI names no host (nbd+unix:///EXPORT?socket=PATH)")
        if not options.get("socket", "").startswith("/"):
            raise _bad(target, "a +unix URI needs socket=/absolute/path")
    else:
        if "socket" in options:
            raise _bad(target, "socket= belongs to nbd+unix:// URIs")
        if not parts.hostname:
            raise _bad(target, "no host (nbd://HOST[:PORT]/EXPORT)")
        if port == 0:
            raise _bad(target, "port 0")
    if any(k in options for k in TLS_OPTIONS) and not parts.scheme.startswith("nbds"):
        raise _bad(target, "TLS options need an nbds:// or nbds+unix:// URI")
    query = f"?{_query(options)}" if options else ""
    # (urlunsplit would drop the empty authority of nbd+unix:///)
    uri = f"{parts.scheme}://{parts.netloc}{parts.path}{query}"
    return NbdTarget(uri, **timeouts)


def _strerror(res: int) -> OSError:
    return OSError(-res, os.strerror(-res))


class NbdDisk(Disk):
    """One NBD export. The export's size and read-only flag are what the server says (a
    read-only export makes the disk read-only); discard is a WRITE_ZEROES that lets the
    server release the space, offered when the server supports it."""

    def __init__(self, target: str, readonly: bool = False) -> None:
        self.target = parse_target(target)
        avail = ffi.new("char[256]")
        if not lib.blkpy_nbd_available(avail, len(avail)):
            raise DiskError(f"NBD target {target!r}: {ffi.string(avail).decode(errors='replace')}")
        msg = ffi.new("char[512]")
        conn = lib.blkpy_nbd_open(self.target.uri.encode(), int(readonly),
                                  int(CONNECT_TIMEOUT_S * 1000),
                                  int(self.target.reconnect_delay * 1000),
                                  int(self.target.request_timeout * 1000), msg, len(msg))
        if conn == ffi.NULL:
            raise DiskError(f"cannot open {self.target.uri}: "
                            f"{ffi.string(msg).decode(errors='replace')}")
        self._conn = conn
        self._closed = False
        self._sync: DiskQueue | None = None
        self._seen = (0, 0, 0)  # (reconnects, expiries, stalls) last logged
        info = self.info()
        if info.block_min > 4096:
            self.close()
            raise DiskError(f"{self.target.uri}: minimum block size {info.block_min} is "
                            f"larger than a 4096-byte sector")
        self.sector_size = 4096 if info.block_min == 4096 else 512
        self.readonly = readonly or bool(info.read_only)
        self.refresh_size()
        self.can_discard = bool(info.can_zero) and not self.readonly
        self.discard_granularity = max(4096, min(info.block_preferred, 1 << 20))
        self._sync = self.queue()
        self._sync_lock = threading.Lock()
        log.info("%s: %d bytes%s, structured replies %s, TLS %s, flush %s, zero %s, trim %s",
                 self.target.uri, info.size, " read-only" if info.read_only else "",
                 _yes(info.structured_replies), _yes(info.tls), _yes(info.can_flush),
                 _yes(info.can_zero), _yes(info.can_trim))

    def info(self) -> object:
        """The export as negotiated on the current connection (struct blkpy_nbd_info)."""
        info = ffi.new("struct blkpy_nbd_info *")
        lib.blkpy_nbd_get_info(self._conn, info)
        return info

    def stats(self) -> dict[str, int]:
        st = ffi.new("struct blkpy_nbd_stats *")
        lib.blkpy_nbd_get_stats(self._conn, st)
        return {k: int(getattr(st, k)) for k in ("commands", "reconnects", "retried",
                                                  "expired", "stalls", "state",
                                                  "last_errno")}

    def queue(self) -> DiskQueue:
        """A completion queue of its own on the connection (one per ring's engine and
        loop)."""
        return DiskQueue(lib.blkpy_nbd_queue_new(self._conn), "an NBD completion queue")

    def engine(self) -> QueueEngine:
        return QueueEngine(self, self.queue())

    def loop_queue(self) -> DiskQueue:
        # The ring loop sends reads, writes, flushes and discards (zeroing the range)
        # itself and answers each as it completes; the Python engine keeps what it leaves.
        return self.queue()

    def drop_connection(self) -> None:
        """Break the connection as a network failure would (tests): it reconnects."""
        lib.blkpy_nbd_drop(self._conn)

    def give_up(self) -> None:
        """Requests waiting for a lost connection fail now, not after reconnect-delay,
        and a server holding requests without a reply is dropped after 2 s: a serve told
        to stop whose server is gone exits at once (closing waits for every request, and
        its flush would wait for the connection)."""
        if not self._closed:
            lib.blkpy_nbd_give_up(self._conn)

    def refresh_size(self) -> int:
        # `blkpy serve` calls this every few seconds: the place to report the connection's
        # ups and downs without a cost on the data path.
        self._log_reconnects()
        size = int(self.info().size)
        self.size = size - size % self.sector_size
        return self.size

    def _log_reconnects(self) -> None:
        st = self.stats()
        seen = (st["reconnects"], st["expired"], st["stalls"])
        if seen != self._seen:
            log.warning("%s: %s; %d reconnect(s), %d command(s) retried, reconnect delay "
                        "ran out %d time(s), %d connection(s) dropped for a server that "
                        "stopped answering", self.target.uri,
                        _STATES.get(st["state"], "?"), st["reconnects"], st["retried"],
                        st["expired"], st["stalls"])
            self._seen = seen

    # ---- the synchronous Disk interface (image tools, --engine sync/thread) -------------

    def _run(self, kind: int, offset: int, length: int,
             bufs: Sequence[memoryview] = ()) -> None:
        keep = [ffi.from_buffer(b) for b in bufs]
        iov = np.array([(int(ffi.cast("uintptr_t", p)), len(p)) for p in keep],
                       dtype=np.uint64).reshape(-1, 2)
        op = np.zeros(1, dtype=OP_DTYPE)
        op["kind"], op["offset"], op["length"] = kind, offset, length
        op["iov_addr"], op["iov_count"] = iov.ctypes.data, len(iov)
        assert self._sync is not None, "disk is closed"
        with self._sync_lock:
            err = self._sync.submit(op)
            while not err:
                done = self._sync.reap()
                if done:
                    err = done[0][1]
                    break
                self._sync.wait(None)
        del keep
        if err:
            raise _strerror(err)

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.check_range(offset, sum(len(b) for b in bufs))
        self._run(io.READ, offset, sum(len(b) for b in bufs), bufs)

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        if self.readonly:
            raise PermissionError(errno.EROFS, "disk is read-only")
        self.check_range(offset, sum(len(b) for b in bufs))
        self._run(io.WRITE, offset, sum(len(b) for b in bufs), bufs)

    def flush(self) -> None:
        if not self.readonly:
            self._run(io.FLUSH, 0, 0)

    def discard(self, offset: int, length: int) -> None:
        """NBD WRITE_ZEROES without NO_HOLE: reads as zeros, space released if the server
        can."""
        if self.readonly:
            raise PermissionError(errno.EROFS, "disk is read-only")
        self.check_range(offset, length)
        if length:
            self._run(io.DISCARD, offset, length)

    def trim(self, offset: int, length: int) -> None:
        """NBD TRIM: the server may drop the range; what it then reads is unspecified."""
        if self.readonly:
            raise PermissionError(errno.EROFS, "disk is read-only")
        self.check_range(offset, length)
        if length:
            self._run(TRIM, offset, length)

    def close(self) -> None:
        """Flush (the next host to open the export must find every write durable), then
        disconnect. Every engine must have been closed."""
        if self._closed:
            return
        self._closed = True
        if self._sync is not None:
            try:
                self.flush()
            except OSError as exc:
                log.warning("%s: flush before disconnecting failed: %s", self.target.uri, exc)
            self._sync.close()
        lib.blkpy_nbd_close(self._conn)


def _yes(flag: int) -> str:
    return "yes" if flag else "no"
