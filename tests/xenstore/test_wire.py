"""The wire codec: header layout, strings, incremental decoding."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkpy.xenstore.wire import (
    HEADER_SIZE,
    PAYLOAD_MAX,
    Decoder,
    Message,
    MsgType,
    NoEntry,
    ProtocolError,
    XenstoreError,
    encode_message,
    error_message,
    error_name_of,
    join_strings,
    make_error,
    split_strings,
)

messages = st.builds(
    Message,
    type=st.integers(0, 0xFFFFFFFF),
    req_id=st.integers(0, 0xFFFFFFFF),
    tx_id=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=PAYLOAD_MAX),
)


def test_worked_examples_from_the_spec():
    read = encode_message(MsgType.READ, 7, 0, join_strings("/a"))
    assert read.hex(" ") == "02 00 00 00 07 00 00 00 00 00 00 00 03 00 00 00 2f 61 00"
    reply = error_message(Message(MsgType.READ, 7, 0, b"/a\0"), "ENOENT").encode()
    assert reply == bytes.fromhex("10000000 07000000 00000000 07000000") + b"ENOENT\0"
    write = encode_message(MsgType.WRITE, 0, 0, b"/a\0xy")
    assert write[:4] == b"\x0b\0\0\0" and write[12:16] == b"\x05\0\0\0"
    watch = encode_message(MsgType.WATCH, 0, 0, join_strings("/local/domain/0/backend/vbd", "tok"))
    assert watch[12:16] == (32).to_bytes(4, "little")


def test_type_numbers_match_xs_wire():
    assert (MsgType.CONTROL, MsgType.WATCH_EVENT, MsgType.ERROR) == (0, 15, 16)
    assert (MsgType.RESET_WATCHES, MsgType.DIRECTORY_PART, MsgType.INVALID) == (21, 22, 0xFFFF)
    assert 20 not in {t.value for t in MsgType}  # RESTRICT was removed


@given(messages)
def test_encode_decode_round_trip(msg):
    data = msg.encode()
    assert len(data) == HEADER_SIZE + len(msg.payload)
    assert Decoder().feed(data) == [msg]


@given(st.lists(messages, max_size=6), st.data())
def test_decoding_is_independent_of_chunking(msgs, data):
    stream = b"".join(m.encode() for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = Decoder()
    decoded = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoded += decoder.feed(stream[start:end])
    assert decoded == msgs
    assert decoder.pending == 0


def test_oversized_length_is_a_protocol_error_and_sticks():
    decoder = Decoder()
    header = encode_message(MsgType.READ, 1, 0, b"")[:12] + (PAYLOAD_MAX + 1).to_bytes(4, "little")
    with pytest.raises(ProtocolError):
        decoder.feed(header)
    with pytest.raises(ProtocolError):
        decoder.feed(encode_message(MsgType.READ, 1, 0, b"/\0"))


def test_device_limit_is_configurable():
    decoder = Decoder(max_payload=4080)
    assert decoder.feed(encode_message(MsgType.WRITE, 1, 0, b"x" * 4080))
    with pytest.raises(ProtocolError):
        Decoder(max_payload=4080).feed(encode_message(MsgType.WRITE, 1, 0, b"x" * 4081))


def test_encoder_refuses_oversized_payloads():
    with pytest.raises(XenstoreError) as info:
        encode_message(MsgType.WRITE, 1, 0, b"x" * (PAYLOAD_MAX + 1))
    assert info.value.errno_name == "E2BIG"


@given(st.lists(st.binary(max_size=20).filter(lambda b: b"\0" not in b), max_size=8))
def test_strings_round_trip(parts):
    assert split_strings(join_strings(*parts)) == parts


def test_malformed_strings():
    with pytest.raises(XenstoreError, match="EINVAL"):
        split_strings(b"/a\0tok")
    with pytest.raises(ValueError):
        join_strings("a\0b")


def test_errors_carry_name_and_number():
    err = make_error("ENOENT", "READ /a")
    assert isinstance(err, NoEntry) and err.errno_name == "ENOENT" and err.errno == 2
    assert "READ /a" in str(err)
    assert type(make_error("EAGAIN")) is XenstoreError and make_error("EAGAIN").errno == 11
    assert error_name_of(b"EACCES\0") == "EACCES"
    assert error_name_of(b"") == "EINVAL"
