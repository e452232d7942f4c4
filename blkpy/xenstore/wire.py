"""The xenstore wire protocol (xs_wire.h) as a sans-IO codec.

Every message in both directions is a 16-byte header -- type, req_id, tx_id, len, each a
host-order uint32 (all Xen hosts are little-endian) -- followed by ``len`` payload bytes made
of NUL-terminated strings (values are the exception: raw, unterminated bytes).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import struct

HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size
#: XENSTORE_PAYLOAD_MAX: the largest payload in either direction.
PAYLOAD_MAX = 4096
#: Through /dev/xen/xenbus the kernel's buffer holds header + payload in 4096 bytes.
DEVICE_PAYLOAD_MAX = PAYLOAD_MAX - HEADER_SIZE
ABS_PATH_MAX = 3072
REL_PATH_MAX = 2048


class MsgType(enum.IntEnum):
    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was RESTRICT, removed: invalid.
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    GET_FEATURE = 23
    SET_FEATURE = 24
    GET_QUOTA = 25
    SET_QUOTA = 26
    INVALID = 0xFFFF


#: xsd_errors in xs_wire.h order; the name travels on the wire, never the number.
ERROR_NAMES: tuple[str, ...] = (
    "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
    "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM",
)  # fmt: skip

OK = b"OK\0"


class ProtocolError(Exception):
    """The byte stream violates the protocol; the connection cannot be used any more."""


class XenstoreError(Exception):
    """An ERROR reply (or a locally detected equivalent), named like xsd_errors."""

    def __init__(self, errno_name: str, context: str = "") -> None:
        self.errno_name = errno_name
        #: the Linux errno number for the name (EINVAL if the name is unknown)
        self.errno = getattr(errno, errno_name, errno.EINVAL)
        self.context = context
        super().__init__(f"{errno_name}: {context}" if context else errno_name)


class NoEntry(XenstoreError):
    """ENOENT: the node (or transaction) does not exist."""

    def __init__(self, context: str = "") -> None:
        super().__init__("ENOENT", context)


def make_error(errno_name: str, context: str = "") -> XenstoreError:
    """The exception for an errno name: NoEntry for ENOENT, else XenstoreError."""
    if errno_name == "ENOENT":
        return NoEntry(context)
    return XenstoreError(errno_name, context)


@dataclasses.dataclass(frozen=True)
class Message:
    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        return encode_message(self.type, self.req_id, self.tx_id, self.payload)

    def strings(self) -> list[bytes]:
        """The payload as NUL-terminated strings (raises XenstoreError EINVAL if malformed)."""
        return split_strings(self.payload)


def encode_message(msg_type: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    if len(payload) > PAYLOAD_MAX:
        raise XenstoreError("E2BIG", f"payload of {len(payload)} bytes")
    return HEADER.pack(msg_type, req_id, tx_id, len(payload)) + payload


def join_strings(*parts: bytes | str) -> bytes:
    """``a\\0b\\0...``: every part NUL-terminated (str parts are encoded as UTF-8)."""
    out = bytearray()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        if b"\0" in data:
            raise ValueError(f"NUL inside a xenstore string: {data!r}")
        out += data + b"\0"
    return bytes(out)


def split_strings(payload: bytes) -> list[bytes]:
    """Inverse of join_strings. An empty payload has no strings; a payload whose last
    string lacks its NUL is malformed (EINVAL), as C xenstored's argument parsing says."""
    if not payload:
        return []
    if not payload.endswith(b"\0"):
        raise XenstoreError("EINVAL", "unterminated string in payload")
    return payload[:-1].split(b"\0")


def error_message(request: Message, errno_name: str) -> Message:
    """The ERROR reply to ``request``."""
    return Message(MsgType.ERROR, request.req_id, request.tx_id, join_strings(errno_name))


def error_name_of(payload: bytes) -> str:
    """The errno name carried by an ERROR payload (tolerates a missing NUL)."""
    name = payload.split(b"\0", 1)[0].decode("ascii", "replace")
    return name or "EINVAL"


class Decoder:
    """Incremental decoder: feed bytes as they arrive, get whole messages out.

    A header announcing more than ``max_payload`` bytes is a protocol error (C xenstored
    drops such a connection); after it the decoder refuses further input.
    """

    def __init__(self, max_payload: int = PAYLOAD_MAX) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload
        self._broken: ProtocolError | None = None

    def feed(self, data: bytes) -> list[Message]:
        if self._broken is not None:
            raise self._broken
        self._buffer += data
        messages = []
        offset = 0
        while len(self._buffer) - offset >= HEADER_SIZE:
            msg_type, req_id, tx_id, length = HEADER.unpack_from(self._buffer, offset)
            if length > self._max_payload:
                self._broken = ProtocolError(
                    f"message length {length} exceeds the {self._max_payload}-byte limit"
                )
                del self._buffer[:]
                raise self._broken
            end = offset + HEADER_SIZE + length
            if end > len(self._buffer):
                break
            payload = bytes(self._buffer[offset + HEADER_SIZE : end])
            messages.append(Message(msg_type, req_id, tx_id, payload))
            offset = end
        del self._buffer[:offset]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._buffer)
