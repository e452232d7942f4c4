"""The protocol engine: wire messages in, replies and events out."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkpy.xenstore.daemon import Connection
from blkpy.xenstore.store import Store
from blkpy.xenstore.wire import (
    PAYLOAD_MAX,
    Decoder,
    Message,
    MsgType,
    ProtocolError,
    encode_message,
    join_strings,
)


class Peer:
    """A client of a Connection that speaks raw messages."""

    def __init__(self, store, domid=None):
        self.conn = Connection(store)
        self.decoder = Decoder()
        self.next_id = 100
        if domid is not None:
            assert self.request(MsgType.CONTROL, join_strings("set-domid", str(domid))) == (
                MsgType.CONTROL,
                b"OK\0",
            )

    def send(self, msg_type, payload, tx_id=0):
        self.next_id += 1
        self.conn.receive(encode_message(msg_type, self.next_id, tx_id, payload))
        return self.next_id

    def output(self):
        return self.decoder.feed(self.conn.pop_output())

    def request(self, msg_type, payload, tx_id=0):
        req_id = self.send(msg_type, payload, tx_id)
        out = self.output()
        replies = [m for m in out if m.type != MsgType.WATCH_EVENT]
        assert len(replies) == 1 and replies[0].req_id == req_id and replies[0].tx_id == tx_id
        return replies[0].type, replies[0].payload


@pytest.fixture
def store():
    return Store()


@pytest.fixture
def dom0(store):
    return Peer(store)


ERR = MsgType.ERROR


def test_basic_requests(dom0):
    assert dom0.request(MsgType.WRITE, b"/a/b\0val") == (MsgType.WRITE, b"OK\0")
    assert dom0.request(MsgType.READ, b"/a/b\0") == (MsgType.READ, b"val")
    assert dom0.request(MsgType.DIRECTORY, b"/a\0") == (MsgType.DIRECTORY, b"b\0")
    assert dom0.request(MsgType.DIRECTORY, b"/a/b\0") == (MsgType.DIRECTORY, b"")
    assert dom0.request(MsgType.GET_PERMS, b"/a\0") == (MsgType.GET_PERMS, b"n0\0")
    assert dom0.request(MsgType.SET_PERMS, b"/a\0n0\0r3\0") == (MsgType.SET_PERMS, b"OK\0")
    assert dom0.request(MsgType.GET_PERMS, b"/a\0") == (MsgType.GET_PERMS, b"n0\0r3\0")
    assert dom0.request(MsgType.MKDIR, b"/m\0") == (MsgType.MKDIR, b"OK\0")
    assert dom0.request(MsgType.RM, b"/a\0") == (MsgType.RM, b"OK\0")
    assert dom0.request(MsgType.READ, b"/a/b\0") == (ERR, b"ENOENT\0")
    assert dom0.request(MsgType.GET_DOMAIN_PATH, b"3\0") == (
        MsgType.GET_DOMAIN_PATH,
        b"/local/domain/3\0",
    )
    assert dom0.request(MsgType.WRITE, b"rel\0x") == (MsgType.WRITE, b"OK\0")
    assert dom0.request(MsgType.READ, b"/local/domain/0/rel\0") == (MsgType.READ, b"x")


@pytest.mark.parametrize(
    "msg_type, payload",
    [
        (MsgType.READ, b"/a"),  # unterminated
        (MsgType.READ, b"/a\0/b\0"),  # two args
        (MsgType.READ, b""),
        (MsgType.WRITE, b"/a"),  # no separator
        (MsgType.WATCH, b"/a\0"),
        (MsgType.WATCH, b"/a\0t\0extra\0"),
        (MsgType.SET_PERMS, b"/a\0"),
        (MsgType.SET_PERMS, b"/a\0q0\0"),
        (MsgType.GET_DOMAIN_PATH, b"abc\0"),
        (MsgType.GET_DOMAIN_PATH, b"-1\0"),
        (MsgType.TRANSACTION_END, b"X\0"),
        (MsgType.CONTROL, b"nonsense\0"),
        (MsgType.CONTROL, b"set-domid\0x\0"),
        (MsgType.DIRECTORY_PART, b"/\0x\0"),
    ],
)
def test_malformed_requests_get_einval(dom0, msg_type, payload):
    assert dom0.request(msg_type, payload) == (ERR, b"EINVAL\0")


@pytest.mark.parametrize("msg_type", [15, 16, 20, 23, 25, 999, 0xFFFF, 0xFFFFFFFF])
def test_unknown_or_server_only_types_get_enosys(dom0, msg_type):
    assert dom0.request(msg_type, b"x\0") == (ERR, b"ENOSYS\0")


@pytest.mark.parametrize(
    "msg_type, payload",
    [
        (MsgType.CONTROL, b"release\0" + b"3\0"),
        (MsgType.INTRODUCE, b"3\0" + b"1\0" + b"2\0"),
        (MsgType.RELEASE, b"3\0"),
        (MsgType.IS_DOMAIN_INTRODUCED, b"3\0"),
        (MsgType.RESUME, b"3\0"),
        (MsgType.SET_TARGET, b"3\0" + b"4\0"),
    ],
)
def test_privileged_types_refused_to_guests(store, msg_type, payload):
    assert Peer(store, domid=5).request(msg_type, payload) == (ERR, b"EACCES\0")


def test_set_domid_only_as_first_message(store, dom0):
    dom0.request(MsgType.READ, b"/\0")
    assert dom0.request(MsgType.CONTROL, b"set-domid\0" + b"5\0") == (ERR, b"EINVAL\0")
    guest = Peer(store, domid=5)
    assert guest.conn.session.domid == 5 and not guest.conn.session.privileged
    assert guest.request(MsgType.CONTROL, b"set-domid\0" + b"6\0") == (ERR, b"EACCES\0")
    assert guest.request(MsgType.WRITE, b"/x\0v") == (ERR, b"EACCES\0")


def test_domain_control(store, dom0):
    dom0.request(MsgType.WATCH, b"@releaseDomain\0r\0")
    dom0.request(MsgType.WATCH, b"@introduceDomain\0i\0")
    dom0.output()
    assert dom0.request(MsgType.IS_DOMAIN_INTRODUCED, b"8\0") == (
        MsgType.IS_DOMAIN_INTRODUCED,
        b"F\0",
    )
    dom0.send(MsgType.INTRODUCE, b"8\0" + b"123\0" + b"4\0")
    dom0.send(MsgType.CONTROL, b"release\0" + b"8\0")
    out = dom0.output()
    assert [m.payload for m in out if m.type == MsgType.WATCH_EVENT] == [
        b"@introduceDomain\0i\0",
        b"@releaseDomain\0r\0",
    ]
    assert dom0.request(MsgType.RESUME, b"8\0") == (ERR, b"ENOSYS\0")


def test_watch_reply_precedes_the_initial_event(dom0):
    req_id = dom0.send(MsgType.WATCH, b"/w\0tok\0", tx_id=77)  # tx_id is ignored
    out = dom0.output()
    assert [(m.type, m.req_id) for m in out] == [(MsgType.WATCH, req_id), (MsgType.WATCH_EVENT, 0)]
    assert out[1] == Message(MsgType.WATCH_EVENT, 0, 0, b"/w\0tok\0")
    assert dom0.request(MsgType.WATCH, b"/w\0tok\0") == (ERR, b"EEXIST\0")


def test_events_can_be_held_back(dom0):
    req_id = dom0.send(MsgType.WATCH, b"/w\0t\0")
    held = dom0.decoder.feed(dom0.conn.pop_output(events=False))
    assert [(m.type, m.req_id) for m in held] == [(MsgType.WATCH, req_id)]
    assert dom0.conn.has_events()
    assert dom0.decoder.feed(dom0.conn.pop_output()) == [
        Message(MsgType.WATCH_EVENT, 0, 0, b"/w\0t\0")
    ]


def test_binary_tokens_round_trip(dom0):
    dom0.send(MsgType.WATCH, b"/w\0\xff\x01tok\0")
    assert [m.payload for m in dom0.output()] == [b"OK\0", b"/w\0\xff\x01tok\0"]


def test_transactions_over_the_wire(dom0):
    kind, payload = dom0.request(MsgType.TRANSACTION_START, b"\0")
    tx = int(payload.rstrip(b"\0"))
    assert kind == MsgType.TRANSACTION_START and payload.endswith(b"\0") and tx != 0
    assert dom0.request(MsgType.WRITE, b"/t\0v", tx_id=tx) == (MsgType.WRITE, b"OK\0")
    assert dom0.request(MsgType.READ, b"/t\0") == (ERR, b"ENOENT\0")
    assert dom0.request(MsgType.TRANSACTION_START, b"\0", tx_id=tx) == (ERR, b"EBUSY\0")
    assert dom0.request(MsgType.TRANSACTION_START, b"\0", tx_id=tx + 1) == (ERR, b"ENOENT\0")
    assert dom0.request(MsgType.READ, b"/t\0", tx_id=tx + 1) == (ERR, b"ENOENT\0")
    assert dom0.request(MsgType.TRANSACTION_END, b"T\0", tx_id=tx) == (
        MsgType.TRANSACTION_END,
        b"OK\0",
    )
    assert dom0.request(MsgType.READ, b"/t\0") == (MsgType.READ, b"v")
    assert dom0.request(MsgType.TRANSACTION_END, b"T\0", tx_id=tx) == (ERR, b"ENOENT\0")


def test_reset_watches(dom0):
    dom0.request(MsgType.WATCH, b"/w\0t\0")
    assert dom0.request(MsgType.RESET_WATCHES, b"\0") == (MsgType.RESET_WATCHES, b"OK\0")
    dom0.request(MsgType.WRITE, b"/w\0")
    assert dom0.output() == []


def test_directory_too_big_and_in_parts(dom0):
    names = [f"child-number-{i:05d}" for i in range(400)]  # ~8 KiB of names
    for name in names:
        dom0.request(MsgType.MKDIR, join_strings(f"/big/{name}"))
    assert dom0.request(MsgType.DIRECTORY, b"/big\0") == (ERR, b"E2BIG\0")
    got, offset, generation = [], 0, None
    while True:
        kind, payload = dom0.request(MsgType.DIRECTORY_PART, join_strings("/big", str(offset)))
        assert kind == MsgType.DIRECTORY_PART and len(payload) <= PAYLOAD_MAX
        gen, _, rest = payload.partition(b"\0")
        assert generation in (None, gen)
        generation = gen
        if rest.endswith(b"\0\0") or rest == b"\0":
            got += rest[:-2].split(b"\0") if rest != b"\0" else []
            break
        got += rest[:-1].split(b"\0")
        offset += len(rest)
    assert [n.decode() for n in got] == names


def test_oversized_header_is_a_protocol_error(dom0):
    header = encode_message(MsgType.READ, 1, 0, b"")[:12] + (PAYLOAD_MAX + 1).to_bytes(4, "little")
    with pytest.raises(ProtocolError):
        dom0.conn.receive(header)


def test_requests_may_arrive_in_pieces(dom0):
    data = encode_message(MsgType.WRITE, 5, 0, b"/p\0v") + encode_message(
        MsgType.READ, 6, 0, b"/p\0"
    )
    for i in range(len(data)):
        dom0.conn.receive(data[i : i + 1])
    assert [(m.req_id, m.payload) for m in dom0.output()] == [(5, b"OK\0"), (6, b"v")]


@settings(max_examples=300)
@given(st.integers(0, 30), st.integers(0, 3), st.binary(max_size=64))
def test_arbitrary_requests_never_crash_the_engine(msg_type, tx_id, payload):
    store = Store()
    for peer in (Peer(store), Peer(store, domid=3)):
        kind, _ = peer.request(msg_type, payload, tx_id)
        assert kind in (msg_type, MsgType.ERROR)


words = st.sampled_from(
    [b"/a", b"/a/b", b"/a/b/c", b"rel", b"/local/domain/3", b"/local/domain/3/x", b"@releaseDomain",
     b"@introduceDomain", b"n0", b"r3", b"b3", b"n3", b"T", b"F", b"3", b"0", b"", b"tok", b"/", b"x" * 70]
)  # fmt: skip
requests = st.tuples(
    st.sampled_from([t for t in MsgType if t not in (MsgType.WATCH_EVENT, MsgType.ERROR)]),
    st.sampled_from([0, 1, 2]),
    st.lists(words, max_size=4).map(lambda ws: b"".join(w + b"\0" for w in ws)),
    st.booleans(),
)


@settings(max_examples=200)
@given(st.lists(requests, max_size=25))
def test_request_sequences_keep_the_store_consistent(sequence):
    store = Store()
    peers = [Peer(store), Peer(store, domid=3)]
    for msg_type, tx_id, payload, as_guest in sequence:
        peer = peers[as_guest]
        kind, _ = peer.request(msg_type, payload, tx_id)
        assert kind in (msg_type, MsgType.ERROR)
    for peer in peers:
        peer.conn.close()
    for path, node in store._nodes.items():
        for child in node.children:
            assert f"{path.rstrip('/')}/{child}" in store._nodes
