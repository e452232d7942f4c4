"""The simulated xenstored's protocol engine, sans-IO: one Connection per client turns the
bytes it receives into calls on the shared Store and gives back the bytes to send (replies,
then watch events).

blkpy's simulation extension: a connection is privileged dom0 unless its FIRST message is
CONTROL with payload ``set-domid\\0<N>\\0``; from then on it is unprivileged domain N (relative
paths resolve under /local/domain/N, permissions and quotas apply) and its closing fires
@releaseDomain. A privileged connection may send CONTROL ``release\\0<N>\\0`` to fire
@releaseDomain for domain N.
"""

from __future__ import annotations

from collections.abc import Callable

from blkpy.xenstore.store import Session, Store, parse_domid
from blkpy.xenstore.wire import (
    OK,
    PAYLOAD_MAX,
    Decoder,
    Message,
    MsgType,
    XenstoreError,
    error_message,
    join_strings,
)


def _text(data: bytes) -> str:
    # latin-1 maps bytes 1:1, so tokens round-trip exactly; paths are validated afterwards.
    return data.decode("latin-1")


def _args(msg: Message, count: int) -> list[str]:
    strings = msg.strings()
    if len(strings) != count:
        raise XenstoreError("EINVAL", f"expected {count} arguments, got {len(strings)}")
    return [_text(s) for s in strings]


def _checked(payload: bytes) -> bytes:
    if len(payload) > PAYLOAD_MAX:
        raise XenstoreError("E2BIG", f"reply of {len(payload)} bytes")
    return payload


class Connection:
    """Protocol state of one client connection.

    ``receive`` raises ProtocolError for a stream that cannot be parsed any more (a header
    announcing more than 4096 bytes); the caller then drops the connection, as C xenstored
    does. Every other malformed request gets an ERROR reply."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.session: Session = store.open_session()
        self._decoder = Decoder()
        self._replies = bytearray()
        self._requests_seen = 0

    def receive(self, data: bytes) -> None:
        for msg in self._decoder.feed(data):
            self._replies += self._handle(msg).encode()
            self._requests_seen += 1

    def pop_output(self, events: bool = True) -> bytes:
        """Bytes to send now: pending replies, then (if ``events``) queued watch events.

        Callers with unsent output may pass events=False so that events keep coalescing
        inside the store while the client is slow."""
        out = bytes(self._replies)
        self._replies.clear()
        if events:
            for path, token in self.session.take_events():
                payload = join_strings(path.encode("latin-1"), token.encode("latin-1"))
                if len(payload) <= PAYLOAD_MAX:  # unsendable otherwise; drop it
                    out += Message(MsgType.WATCH_EVENT, 0, 0, payload).encode()
        return out

    def has_events(self) -> bool:
        return self.session.has_events()

    def close(self) -> None:
        self.store.close_session(self.session)

    def _handle(self, msg: Message) -> Message:
        try:
            entry = _HANDLERS.get(msg.type)
            if entry is None:
                raise XenstoreError("ENOSYS", f"message type {msg.type}")
            handler, privileged_only = entry
            if privileged_only and not self.session.privileged:
                raise XenstoreError("EACCES", f"{MsgType(msg.type).name} needs privilege")
            return Message(msg.type, msg.req_id, msg.tx_id, _checked(handler(self, msg)))
        except XenstoreError as err:
            return error_message(msg, err.errno_name)

    # --- handlers: each returns the success payload ---------------------------------

    def _read(self, msg: Message) -> bytes:
        (path,) = _args(msg, 1)
        return self.store.read(self.session, path, msg.tx_id)

    def _write(self, msg: Message) -> bytes:
        path, sep, value = msg.payload.partition(b"\0")
        if not sep:
            raise XenstoreError("EINVAL", "WRITE without a path terminator")
        self.store.write(self.session, _text(path), value, msg.tx_id)
        return OK

    def _mkdir(self, msg: Message) -> bytes:
        (path,) = _args(msg, 1)
        self.store.mkdir(self.session, path, msg.tx_id)
        return OK

    def _rm(self, msg: Message) -> bytes:
        (path,) = _args(msg, 1)
        self.store.rm(self.session, path, msg.tx_id)
        return OK

    def _directory(self, msg: Message) -> bytes:
        (path,) = _args(msg, 1)
        return join_strings(*self.store.directory(self.session, path, msg.tx_id))

    def _directory_part(self, msg: Message) -> bytes:
        path, offset_text = _args(msg, 2)
        if not offset_text.isdigit():
            raise XenstoreError("EINVAL", f"bad offset {offset_text!r}")
        offset = int(offset_text)
        children = join_strings(*self.store.directory(self.session, path, msg.tx_id))
        generation = join_strings(str(self.store.generation(self.session, path, msg.tx_id)))
        if offset > len(children):
            raise XenstoreError("EINVAL", f"offset {offset} past the list")
        rest = children[offset:]
        room = PAYLOAD_MAX - len(generation) - 1
        if len(rest) <= room:
            return generation + rest + b"\0"  # the empty name marks the end
        cut = rest.rfind(b"\0", 0, room) + 1  # whole names only
        return generation + rest[:cut]

    def _get_perms(self, msg: Message) -> bytes:
        (path,) = _args(msg, 1)
        return join_strings(*self.store.get_perms(self.session, path, msg.tx_id))

    def _set_perms(self, msg: Message) -> bytes:
        strings = [_text(s) for s in msg.strings()]
        if len(strings) < 2:
            raise XenstoreError("EINVAL", "SET_PERMS needs a path and permissions")
        self.store.set_perms(self.session, strings[0], strings[1:], msg.tx_id)
        return OK

    def _watch(self, msg: Message) -> bytes:
        path, token = _args(msg, 2)
        self.store.watch(self.session, path, token)
        return OK

    def _unwatch(self, msg: Message) -> bytes:
        path, token = _args(msg, 2)
        self.store.unwatch(self.session, path, token)
        return OK

    def _reset_watches(self, msg: Message) -> bytes:
        self.store.reset_watches(self.session)
        return OK

    def _transaction_start(self, msg: Message) -> bytes:
        if msg.tx_id != 0:
            busy = msg.tx_id in self.session.transactions
            raise XenstoreError("EBUSY" if busy else "ENOENT", "nested TRANSACTION_START")
        return join_strings(str(self.store.transaction_start(self.session)))

    def _transaction_end(self, msg: Message) -> bytes:
        (verdict,) = _args(msg, 1)
        if verdict not in ("T", "F"):
            raise XenstoreError("EINVAL", f"TRANSACTION_END {verdict!r}")
        self.store.transaction_end(self.session, msg.tx_id, commit=verdict == "T")
        return OK

    def _get_domain_path(self, msg: Message) -> bytes:
        (domid,) = _args(msg, 1)
        return join_strings(self.store.get_domain_path(parse_domid(domid)))

    def _introduce(self, msg: Message) -> bytes:
        domid, _gfn, _port = _args(msg, 3)
        self.store.introduce_domain(parse_domid(domid))
        return OK

    def _release(self, msg: Message) -> bytes:
        (domid,) = _args(msg, 1)
        self.store.release_domain(parse_domid(domid))
        return OK

    def _is_domain_introduced(self, msg: Message) -> bytes:
        (domid,) = _args(msg, 1)
        return b"T\0" if self.store.is_domain_introduced(parse_domid(domid)) else b"F\0"

    def _control(self, msg: Message) -> bytes:
        strings = [_text(s) for s in msg.strings()]
        command = strings[0] if strings else ""
        if command == "set-domid" and len(strings) == 2:
            if self._requests_seen != 0:
                raise XenstoreError("EINVAL", "set-domid must be the first message")
            self.store.declare_domid(self.session, parse_domid(strings[1]))
            return OK
        if command == "release" and len(strings) == 2:
            self.store.release_domain(parse_domid(strings[1]))
            return OK
        raise XenstoreError("EINVAL", f"unknown control command {command!r}")


_Handler = Callable[[Connection, Message], bytes]

#: message type -> (handler, privileged only)
_HANDLERS: dict[int, tuple[_Handler, bool]] = {
    MsgType.CONTROL: (Connection._control, True),
    MsgType.DIRECTORY: (Connection._directory, False),
    MsgType.READ: (Connection._read, False),
    MsgType.GET_PERMS: (Connection._get_perms, False),
    MsgType.WATCH: (Connection._watch, False),
    MsgType.UNWATCH: (Connection._unwatch, False),
    MsgType.TRANSACTION_START: (Connection._transaction_start, False),
    MsgType.TRANSACTION_END: (Connection._transaction_end, False),
    MsgType.INTRODUCE: (Connection._introduce, True),
    MsgType.RELEASE: (Connection._release, True),
    MsgType.GET_DOMAIN_PATH: (Connection._get_domain_path, False),
    MsgType.WRITE: (Connection._write, False),
    MsgType.MKDIR: (Connection._mkdir, False),
    MsgType.RM: (Connection._rm, False),
    MsgType.SET_PERMS: (Connection._set_perms, False),
    MsgType.IS_DOMAIN_INTRODUCED: (Connection._is_domain_introduced, True),
    MsgType.RESET_WATCHES: (Connection._reset_watches, False),
    MsgType.DIRECTORY_PART: (Connection._directory_part, False),
}


def _unsupported(conn: Connection, msg: Message) -> bytes:
    raise XenstoreError("ENOSYS", f"message type {msg.type} is not simulated")


# Privileged-only types this simulation does not implement: ENOSYS for dom0, EACCES else.
for _type in (MsgType.RESUME, MsgType.SET_TARGET, MsgType.SET_FEATURE, MsgType.SET_QUOTA):
    _HANDLERS[_type] = (_unsupported, True)
