"""A blocking xenstore client over the xenstored unix socket or /dev/xen/xenbus.

One request is in flight at a time; watch events that arrive while a reply is awaited are
queued and handed out by ``events()``/``wait_event()``. ``fileno()`` polls readable when
events may be waiting, for an event loop's add_reader -- but always call ``events()`` after
any request too: events read together with a reply are already buffered. Not thread-safe:
use one client per thread.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import select
import socket
import stat
import time
from collections.abc import Callable
from typing import NoReturn, TypeVar

from blkpy.xenstore.wire import (
    DEVICE_PAYLOAD_MAX,
    PAYLOAD_MAX,
    Decoder,
    Message,
    MsgType,
    NoEntry,
    ProtocolError,
    XenstoreError,
    encode_message,
    error_name_of,
    join_strings,
    make_error,
    split_strings,
)

__all__ = ["XenstoreClient", "XenstoreError", "NoEntry", "default_path"]

T = TypeVar("T")

#: Where xenstored is looked for when neither an argument nor $XENSTORED_PATH says.
DEFAULT_PATHS = ("/run/xenstored/socket", "/var/run/xenstored/socket", "/dev/xen/xenbus")


def default_path() -> str:
    """$XENSTORED_PATH, else the first of DEFAULT_PATHS that exists."""
    env = os.environ.get("XENSTORED_PATH")
    if env:
        return env
    for path in DEFAULT_PATHS:
        if os.path.exists(path):
            return path
    raise ConnectionError(
        "no xenstored found (tried " + ", ".join(DEFAULT_PATHS) + "); set XENSTORED_PATH"
    )


def device_write_error(err: OSError) -> XenstoreError | None:
    """The request error behind a failed write() to /dev/xen/xenbus, or None when the
    failure concerns the connection. The kernel refuses one message with ESRCH (unknown
    transaction: xenstored would say ENOENT), E2BIG or EINVAL (too long), and the file stays
    usable."""
    names = {errno.ESRCH: "ENOENT", errno.E2BIG: "E2BIG", errno.EINVAL: "EINVAL"}
    if err.errno not in names:
        return None
    return make_error(names[err.errno], f"xenbus device refused the request: {err.strerror}")


def _decode(data: bytes) -> str:
    # surrogateescape: a token registered as str comes back equal, whatever its bytes.
    return data.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class XenstoreClient:
    """A connection to xenstored. Create it with ``XenstoreClient.connect()``."""

    def __init__(self, fd: int, path: str, owner: socket.socket | None) -> None:
        self._fd = fd
        self._owner = owner  # keeps a socket object (and its fd) alive
        self.path = path
        #: the xenbus device answers WATCH/UNWATCH itself and caps payloads at 4080 bytes
        self.is_device = owner is None
        self._payload_max = DEVICE_PAYLOAD_MAX if self.is_device else PAYLOAD_MAX
        self._decoder = Decoder()
        self._events: collections.deque[tuple[str, str]] = collections.deque()
        self._req_id = 0
        self._closed = False
        self._broken: str | None = None

    @classmethod
    def connect(cls, path: str | None = None, domid: int | None = None) -> XenstoreClient:
        """Connect to ``path`` (a socket or the xenbus device; default: default_path()).

        ``domid`` declares the connection as that unprivileged domain (blkpy's simulated
        xenstored only; see blkpy.xenstore.daemon)."""
        path = path or default_path()
        try:
            is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
            if is_socket:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(path)
                except OSError:
                    sock.close()
                    raise
                client = cls(sock.fileno(), path, sock)
            else:
                client = cls(os.open(path, os.O_RDWR | os.O_CLOEXEC), path, None)
        except OSError as err:
            raise ConnectionError(f"cannot connect to xenstored at {path}: {err.strerror}") from err
        if domid is not None:
            if client.is_device:
                client.close()
                raise ValueError("a domid can only be declared to the simulated xenstored")
            try:
                client.control("set-domid", str(domid))
            except BaseException:
                client.close()
                raise
        return client

    # --- nodes ----------------------------------------------------------------------

    def read(self, path: str, tx: int = 0) -> bytes:
        """The node's value; raises NoEntry if it does not exist."""
        return self._request(MsgType.READ, join_strings(_encode(path)), tx, path)

    def read_str(self, path: str, default: str | None = None, tx: int = 0) -> str | None:
        """The value as text (undecodable bytes replaced), or ``default`` if missing."""
        try:
            return self.read(path, tx).decode("utf-8", "replace")
        except NoEntry:
            return default

    def read_many(self, paths: list[str], tx: int = 0) -> list[str | None]:
        """``read_str`` of each path (None where missing), all sent before the first
        answer is awaited: one round trip to xenstored instead of one per node (a
        successor reads a dozen nodes while the guest waits). The xenbus device takes
        them one at a time."""
        if self.is_device or len(paths) < 2:
            return [self.read_str(path, tx=tx) for path in paths]
        values: list[str | None] = []
        for path, reply in zip(paths, self._pipelined(
                MsgType.READ, [join_strings(_encode(path)) for path in paths], tx), strict=True):
            if isinstance(reply, NoEntry):
                values.append(None)
            elif isinstance(reply, XenstoreError):
                raise make_error(reply.errno_name, f"READ {path}")
            else:
                values.append(reply.decode("utf-8", "replace"))
        return values

    def write(self, path: str, value: str | bytes, tx: int = 0) -> None:
        """Set the value, creating the node and missing parents."""
        data = value.encode() if isinstance(value, str) else bytes(value)
        self._request(MsgType.WRITE, _encode(path) + b"\0" + data, tx, path)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self._request(MsgType.MKDIR, join_strings(_encode(path)), tx, path)

    def rm(self, path: str, tx: int = 0) -> None:
        """Remove the node and everything below it (no error if it is already gone)."""
        self._request(MsgType.RM, join_strings(_encode(path)), tx, path)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        """Names of the node's children."""
        try:
            reply = self._request(MsgType.DIRECTORY, join_strings(_encode(path)), tx, path)
        except XenstoreError as err:
            if err.errno_name != "E2BIG":
                raise
            return self._directory_in_parts(path, tx)
        return [_decode(name) for name in split_strings(reply)]

    def children(self, path: str, tx: int = 0) -> list[str]:
        """Names of the node's children; none if it cannot be listed (gone, or never
        there: watchers race the toolstack and optional nodes may be absent)."""
        try:
            return self.directory(path, tx)
        except XenstoreError:
            return []

    def _directory_in_parts(self, path: str, tx: int) -> list[str]:
        # A list longer than one reply: fetch it by byte offset; restart if the node
        # changed between parts (the generation count differs).
        for _ in range(8):
            names: list[bytes] = []
            offset, generation = 0, None
            while True:
                payload = join_strings(_encode(path), str(offset))
                reply = self._request(MsgType.DIRECTORY_PART, payload, tx, path)
                gen, _, rest = reply.partition(b"\0")
                if generation is not None and gen != generation:
                    break
                generation = gen
                chunk = split_strings(rest)
                done = bool(chunk) and chunk[-1] == b""
                names += chunk[:-1] if done else chunk
                offset += len(rest) - (1 if done else 0)
                if done or not chunk:
                    return [_decode(name) for name in names]
        raise make_error("EAGAIN", f"DIRECTORY_PART {path}: list kept changing")

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        """The permission list, e.g. ['n0', 'r5'] (entry 0: owner and default access)."""
        reply = self._request(MsgType.GET_PERMS, join_strings(_encode(path)), tx, path)
        return [_decode(perm) for perm in split_strings(reply)]

    def set_perms(self, path: str, perms: list[str], tx: int = 0) -> None:
        payload = join_strings(_encode(path), *perms)
        self._request(MsgType.SET_PERMS, payload, tx, path)

    def get_domain_path(self, domid: int) -> str:
        reply = self._request(MsgType.GET_DOMAIN_PATH, join_strings(str(domid)), 0, str(domid))
        return _decode(reply.rstrip(b"\0"))

    def control(self, *args: str) -> bytes:
        """A CONTROL command (privileged); the simulated xenstored knows ``set-domid N``
        (first message only) and ``release N`` (fires @releaseDomain)."""
        return self._request(MsgType.CONTROL, join_strings(*args), 0, " ".join(args))

    # --- watches --------------------------------------------------------------------

    def watch(self, path: str, token: str) -> None:
        """Watch ``path`` and everything below it; the first event comes right away."""
        self._request(MsgType.WATCH, join_strings(_encode(path), _encode(token)), 0, path)

    def watch_many(self, watches: list[tuple[str, str]]) -> None:
        """``watch`` each (path, token), all sent before the first answer is awaited."""
        if self.is_device or len(watches) < 2:
            for path, token in watches:
                self.watch(path, token)
            return
        replies = self._pipelined(MsgType.WATCH, [join_strings(_encode(path), _encode(token))
                                                  for path, token in watches], 0)
        for (path, _), reply in zip(watches, replies, strict=True):
            if isinstance(reply, XenstoreError):
                raise make_error(reply.errno_name, f"WATCH {path}")

    def unwatch(self, path: str, token: str) -> None:
        self._request(MsgType.UNWATCH, join_strings(_encode(path), _encode(token)), 0, path)

    def events(self) -> list[tuple[str, str]]:
        """Every (path, token) event received so far, without blocking."""
        while self._poll(0):
            self._receive()
        events = list(self._events)
        self._events.clear()
        return events

    def wait_event(self, timeout: float | None = None) -> tuple[str, str] | None:
        """The next (path, token) event, waiting up to ``timeout`` seconds (None: forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._events:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._poll(remaining):
                return None
            self._receive()
        return self._events.popleft()

    # --- transactions ---------------------------------------------------------------

    def start_transaction(self) -> int:
        reply = self._request(MsgType.TRANSACTION_START, b"\0", 0, "")
        return int(reply.rstrip(b"\0"))

    def end_transaction(self, tx: int, commit: bool = True) -> bool:
        """Commit or abort; False when the commit conflicted (EAGAIN: redo the transaction)."""
        try:
            self._request(MsgType.TRANSACTION_END, b"T\0" if commit else b"F\0", tx, str(tx))
        except XenstoreError as err:
            if err.errno_name == "EAGAIN":
                return False
            raise
        return True

    def run_transaction(self, fn: Callable[[int], T], attempts: int = 32) -> T:
        """Call ``fn(tx)`` inside a transaction until its commit succeeds; an exception
        from ``fn`` aborts the transaction and propagates. Raises XenstoreError EAGAIN
        after ``attempts`` conflicts."""
        for _ in range(attempts):
            tx = self.start_transaction()
            try:
                result = fn(tx)
            except BaseException:
                if not self._closed and self._broken is None:
                    # the original exception matters more than a failed abort
                    with contextlib.suppress(XenstoreError, ConnectionError):
                        self.end_transaction(tx, commit=False)
                raise
            if self.end_transaction(tx, commit=True):
                return result
        raise make_error("EAGAIN", f"transaction still conflicting after {attempts} attempts")

    # --- connection -----------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owner is not None:
            self._owner.close()
        else:
            os.close(self._fd)

    def __enter__(self) -> XenstoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise ConnectionError("xenstore client is closed")
        if self._broken is not None:
            raise ConnectionError(self._broken)

    def _next_request(self, msg_type: MsgType, payload: bytes, tx: int,
                      what: str) -> tuple[int, bytes]:
        """A new request id and the message carrying ``payload`` (E2BIG if too long)."""
        if len(payload) > self._payload_max:
            context = f"{msg_type.name} {what}" if what else msg_type.name
            raise make_error("E2BIG", f"{context}: {len(payload)}-byte payload")
        self._req_id = (self._req_id + 1) & 0xFFFFFFFF or 1
        return self._req_id, encode_message(msg_type, self._req_id, tx, payload)

    def _request(self, msg_type: MsgType, payload: bytes, tx: int, what: str) -> bytes:
        self._check_usable()
        req_id, message = self._next_request(msg_type, payload, tx, what)
        self._send(message)
        # The device answers WATCH/UNWATCH itself, with req_id 0.
        device_answered = self.is_device and msg_type in (MsgType.WATCH, MsgType.UNWATCH)
        while True:
            for reply in self._receive():
                if reply.type not in (msg_type, MsgType.ERROR):
                    continue
                if reply.req_id == req_id or (device_answered and reply.req_id == 0):
                    if reply.type == MsgType.ERROR:
                        raise make_error(error_name_of(reply.payload), f"{msg_type.name} {what}")
                    return reply.payload

    def _pipelined(self, msg_type: MsgType, payloads: list[bytes],
                   tx: int) -> list[bytes | XenstoreError]:
        """Send every request, then collect each one's answer (its payload, or the error
        xenstored gave it), in the order sent."""
        self._check_usable()
        requests = [self._next_request(msg_type, payload, tx, "") for payload in payloads]
        ids = [req_id for req_id, _ in requests]
        self._send(b"".join(message for _, message in requests))
        answers: dict[int, bytes | XenstoreError] = {}
        wanted = set(ids)
        while len(answers) < len(ids):
            for reply in self._receive():
                if reply.req_id not in wanted or reply.type not in (msg_type, MsgType.ERROR):
                    continue
                answers[reply.req_id] = (make_error(error_name_of(reply.payload), msg_type.name)
                                         if reply.type == MsgType.ERROR else reply.payload)
        return [answers[i] for i in ids]

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except InterruptedError:
                continue
            except ConnectionError as err:
                self._fail(f"xenstored at {self.path} closed the connection ({err.strerror})")
            except OSError as err:
                refused = device_write_error(err) if self.is_device else None
                if refused is not None:
                    raise refused from err
                self._fail(f"writing to xenstored at {self.path} failed: {err.strerror}")
            view = view[written:]

    def _poll(self, timeout: float | None) -> bool:
        self._check_usable()
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        ms = None if timeout is None else int(timeout * 1000)
        return bool(poller.poll(ms))

    def _receive(self) -> list[Message]:
        """Read once (blocking); queue the events; return the other messages."""
        self._check_usable()
        try:
            data = os.read(self._fd, 65536)
        except InterruptedError:
            return []
        except OSError as err:
            if err.errno == errno.EAGAIN:
                return []
            if isinstance(err, ConnectionError):
                self._fail(f"xenstored at {self.path} closed the connection ({err.strerror})")
            self._fail(f"reading from xenstored at {self.path} failed: {err.strerror}")
        if not data:
            self._fail(f"xenstored at {self.path} closed the connection")
        try:
            messages = self._decoder.feed(data)
        except ProtocolError as err:
            self._fail(f"xenstored at {self.path} sent garbage: {err}")
        replies = []
        for msg in messages:
            if msg.type == MsgType.WATCH_EVENT:
                strings = msg.payload.split(b"\0")
                if len(strings) >= 2:
                    self._events.append((_decode(strings[0]), _decode(strings[1])))
            else:
                replies.append(msg)
        return replies

    def _fail(self, reason: str) -> NoReturn:
        self._broken = reason
        raise ConnectionError(reason)
