"""XenstoreClient against the simulated xenstored over a real unix socket."""

import errno
import os
import select
import socket
import threading
import time

import pytest

from blkpy.xenstore.client import (
    NoEntry,
    XenstoreClient,
    XenstoreError,
    default_path,
    device_write_error,
)
from blkpy.xenstore.server import start_xenstored, stop_xenstored
from blkpy.xenstore.wire import Decoder, Message, MsgType, join_strings


def test_node_operations(client, base):
    client.write(f"{base}/a/b", "text")
    client.write(f"{base}/bin", b"\x00\xff")
    assert client.read(f"{base}/a/b") == b"text"
    assert client.read(f"{base}/bin") == b"\x00\xff"
    assert client.read_str(f"{base}/a/b") == "text"
    assert client.read_str(f"{base}/bin") == "\x00\ufffd"
    assert client.read_str(f"{base}/missing") is None
    assert client.read_str(f"{base}/missing", default="dflt") == "dflt"
    assert client.directory(base) == ["a", "bin"]
    client.mkdir(f"{base}/empty")
    assert client.read(f"{base}/empty") == b""
    client.rm(f"{base}/a")
    client.rm(f"{base}/a")  # already gone: fine
    assert client.directory(base) == ["bin", "empty"]
    assert client.get_domain_path(3) == "/local/domain/3"


def test_errors_are_named(client, base):
    with pytest.raises(NoEntry) as info:
        client.read(f"{base}/missing")
    assert info.value.errno_name == "ENOENT" and f"{base}/missing" in str(info.value)
    with pytest.raises(XenstoreError) as info:
        client.write(f"{base}//bad", "x")
    assert info.value.errno_name == "EINVAL"
    with pytest.raises(XenstoreError) as info:
        client.write(f"{base}/big", "x" * 4096)  # path + NUL + value > 4096
    assert info.value.errno_name == "E2BIG"
    client.write(f"{base}/ok", "still usable")


def test_permissions(client, base):
    client.write(f"{base}/x", "1")
    client.set_perms(f"{base}/x", ["n0", "r5"])
    assert client.get_perms(f"{base}/x") == ["n0", "r5"]


def test_large_directory_is_fetched_in_parts(client, base):
    names = [f"a-rather-long-child-name-{i:04d}" for i in range(300)]
    tx = client.start_transaction()
    for name in names:
        client.mkdir(f"{base}/{name}", tx)
    assert client.end_transaction(tx)
    assert client.directory(base) == names


def test_transaction_conflict_returns_false(xenstored, client, base):
    client.write(f"{base}/state", "1")
    with XenstoreClient.connect(xenstored) as other:
        tx = client.start_transaction()
        assert client.read(f"{base}/state", tx) == b"1"
        client.write(f"{base}/decision", "based on 1", tx)
        other.write(f"{base}/state", "2")
        assert client.end_transaction(tx) is False
    with pytest.raises(NoEntry):
        client.read(f"{base}/decision")


def test_run_transaction_retries_until_commit(xenstored, client, base):
    client.write(f"{base}/counter", "0")
    attempts = []
    with XenstoreClient.connect(xenstored) as other:

        def increment(tx):
            value = int(client.read(f"{base}/counter", tx))
            attempts.append(value)
            if len(attempts) == 1:
                other.write(f"{base}/counter", "10")  # a concurrent change: conflict
            client.write(f"{base}/counter", str(value + 1), tx)
            return value + 1

        assert client.run_transaction(increment) == 11
    assert attempts == [0, 10]
    assert client.read(f"{base}/counter") == b"11"


def test_run_transaction_aborts_on_exception(client, base):
    def fail(tx):
        client.write(f"{base}/partial", "x", tx)
        raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError):
        client.run_transaction(fail)
    assert client.read_str(f"{base}/partial") is None
    client.write(f"{base}/after", "no transaction left open")


def test_run_transaction_gives_up(xenstored, client, base):
    client.write(f"{base}/hot", "0")
    with XenstoreClient.connect(xenstored) as other:

        def always_conflicting(tx):
            client.read(f"{base}/hot", tx)
            other.write(f"{base}/hot", "changed")

        with pytest.raises(XenstoreError) as info:
            client.run_transaction(always_conflicting, attempts=3)
    assert info.value.errno_name == "EAGAIN"


def test_watch_initial_fire_and_changes(xenstored, client, base):
    client.watch(f"{base}/w", "tok")
    assert client.wait_event(10) == (f"{base}/w", "tok")
    with XenstoreClient.connect(xenstored) as other:
        other.write(f"{base}/w/x", "1")
    assert client.wait_event(10) == (f"{base}/w/x", "tok")
    client.unwatch(f"{base}/w", "tok")
    with pytest.raises(NoEntry):
        client.unwatch(f"{base}/w", "tok")
    assert client.wait_event(0.05) is None


def test_events_read_with_a_reply_are_returned_by_events(xenstored, client, base):
    client.watch(base, "t")
    with XenstoreClient.connect(xenstored) as other:
        other.write(f"{base}/changed", "1")
    # The event precedes this reply on the stream, so this request consumes it.
    client.read(base)
    assert select.select([client], [], [], 0)[0] == []
    assert client.events() == [(base, "t"), (f"{base}/changed", "t")]
    assert client.events() == []


def test_fileno_polls_readable_for_events(xenstored, client, base):
    client.watch(base, "t")
    assert client.events() == [(base, "t")]  # the initial event came with the reply
    with XenstoreClient.connect(xenstored) as other:
        other.write(f"{base}/x", "1")
    assert select.select([client], [], [], 10)[0] == [client]
    assert client.events() == [(f"{base}/x", "t")]


def test_guest_permissions(xenstored, client, base):
    client.write(f"{base}/backend/state", "4")
    client.write(f"{base}/private", "secret")
    client.set_perms(base, ["n0", "r5"])
    client.set_perms(f"{base}/backend", ["n0", "r5"])
    client.set_perms(f"{base}/backend/state", ["n0", "r5"])
    client.mkdir("/local/domain/5")
    client.set_perms("/local/domain/5", ["n5", "r0"])
    with XenstoreClient.connect(xenstored, domid=5) as guest:
        assert guest.read(f"{base}/backend/state") == b"4"
        with pytest.raises(XenstoreError) as info:
            guest.read(f"{base}/private")
        assert info.value.errno_name == "EACCES"
        with pytest.raises(XenstoreError):
            guest.write(f"{base}/backend/state", "6")
        guest.write("device/vbd/51712/state", "1")  # relative: its own home
        assert guest.get_perms("device/vbd/51712/state") == ["n5", "r0"]
        with pytest.raises(XenstoreError) as info:
            guest.set_perms("device", ["n0"])
        assert info.value.errno_name == "EPERM"
    assert client.read("/local/domain/5/device/vbd/51712/state") == b"1"


def test_server_going_away_raises_connection_error(socket_dir):
    path = os.path.join(socket_dir, "socket")
    proc = start_xenstored(path)
    try:
        client = XenstoreClient.connect(path)
        client.watch("/w", "t")
        assert client.wait_event(10) == ("/w", "t")
    finally:
        stop_xenstored(proc)
    with pytest.raises(ConnectionError, match="closed the connection"):
        client.wait_event(10)
    with pytest.raises(ConnectionError):
        client.read("/w")
    client.close()
    with pytest.raises(ConnectionError, match="closed"):
        client.read("/w")


def test_connect_failures(socket_dir, monkeypatch):
    with pytest.raises(ConnectionError, match="cannot connect"):
        XenstoreClient.connect(os.path.join(socket_dir, "nothing"))
    monkeypatch.setenv("XENSTORED_PATH", os.path.join(socket_dir, "from-env"))
    assert default_path() == os.path.join(socket_dir, "from-env")
    with pytest.raises(ConnectionError, match="from-env"):
        XenstoreClient.connect()


def test_connect_uses_xenstored_path(xenstored, monkeypatch, base):
    monkeypatch.setenv("XENSTORED_PATH", xenstored)
    with XenstoreClient.connect() as c:
        c.write(base, "via env")
        assert c.read(base) == b"via env"


class FakeXenbusDevice:
    """A stand-in for /dev/xen/xenbus: answers WATCH itself with req_id 0, echoes others."""

    def __init__(self):
        self.ours, theirs = socket.socketpair()
        self.client = XenstoreClient(os.dup(theirs.fileno()), "fake-xenbus", None)
        theirs.close()
        self.received: list[Message] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        decoder = Decoder()
        while data := self.ours.recv(65536):
            for msg in decoder.feed(data):
                self.received.append(msg)
                if msg.type == MsgType.WATCH:
                    path, token = msg.payload.split(b"\0")[:2]
                    reply = Message(MsgType.WATCH, 0, 0, b"OK\0").encode()
                    event = Message(MsgType.WATCH_EVENT, 0, 0, join_strings(path, token))
                    self.ours.sendall(reply + event.encode())
                else:
                    self.ours.sendall(Message(msg.type, msg.req_id, msg.tx_id, b"v").encode())


def test_xenbus_device_quirks():
    device = FakeXenbusDevice()
    client = device.client
    assert client.is_device
    client.watch("/w", "t")  # replied with req_id 0
    assert client.read("/x") == b"v"
    assert client.events() == [("/w", "t")]
    with pytest.raises(XenstoreError) as info:
        client.write("/x", b"v" * (4080 - 2))  # 4079 bytes with "/x\0": over the device's cap
    assert info.value.errno_name == "E2BIG"
    client.write("/x", b"v" * (4080 - 3))
    assert [m.type for m in device.received] == [MsgType.WATCH, MsgType.READ, MsgType.WRITE]
    with pytest.raises(ValueError):
        XenstoreClient.connect(os.devnull, domid=3)
    client.close()
    device.thread.join(10)


def test_events_of_one_commit_coalesce(xenstored, client, base):
    client.watch(base, "t")
    assert client.wait_event(10) == (base, "t")
    with XenstoreClient.connect(xenstored) as other:

        def rewrite(tx):
            for value in "12345":
                other.write(f"{base}/x", value, tx)

        other.run_transaction(rewrite)
        other.write(f"{base}/marker", "")
    seen = []
    while (event := client.wait_event(10)) not in (None, (f"{base}/marker", "t")):
        seen.append(event)
    assert seen == [(f"{base}/x", "t")]


def test_device_write_errors_concern_one_request():
    unknown_tx = device_write_error(OSError(errno.ESRCH, "No such process"))
    assert isinstance(unknown_tx, NoEntry)
    assert device_write_error(OSError(errno.E2BIG, "too big")).errno_name == "E2BIG"
    assert device_write_error(OSError(errno.EINVAL, "bad")).errno_name == "EINVAL"
    assert device_write_error(OSError(errno.EIO, "gone")) is None


def test_read_many_answers_each_path_in_order_in_one_round_trip(xenstored, client, base):
    client.write(f"{base}/a", "1")
    client.write(f"{base}/b", b"\xff")
    client.watch(base, "t")
    with XenstoreClient.connect(xenstored) as other:
        other.write(f"{base}/c", "3")  # an event on the stream among the answers
    paths = [f"{base}/c", f"{base}/missing", f"{base}/a", f"{base}/b", f"{base}/a"]
    assert client.read_many(paths) == ["3", None, "1", "\ufffd", "1"]
    assert (f"{base}/c", "t") in client.events()  # kept for the watcher, not lost
    assert client.read_many([]) == []
    assert client.read_str(f"{base}/a") == "1"  # the stream is still in step


def test_read_many_sends_every_request_before_reading(xenstored, client, base, monkeypatch):
    client.write(f"{base}/a", "1")
    sends = []
    real = client._send
    monkeypatch.setattr(client, "_send", lambda data: (sends.append(data), real(data)))
    assert client.read_many([f"{base}/a"] * 5) == ["1"] * 5
    assert len(sends) == 1


def test_read_many_raises_what_is_not_a_missing_node(xenstored, client, base):
    client.write(f"{base}/private", "secret")
    client.set_perms(f"{base}/private", ["n0"])
    client.mkdir("/local/domain/6")
    client.set_perms("/local/domain/6", ["n6", "r0"])
    with XenstoreClient.connect(xenstored, domid=6) as guest:
        with pytest.raises(XenstoreError) as info:
            guest.read_many(["/local/domain/6/nothing", f"{base}/private"])
        assert info.value.errno_name == "EACCES" and f"{base}/private" in str(info.value)
        assert guest.read_many(["/local/domain/6/nothing"] * 2) == [None, None]


def test_watch_many_sets_every_watch_in_one_round_trip(xenstored, client, base, monkeypatch):
    sends = []
    real = client._send
    monkeypatch.setattr(client, "_send", lambda data: (sends.append(data), real(data)))
    client.watch_many([(f"{base}/a", "ta"), (f"{base}/b", "tb")])
    assert len(sends) == 1
    with XenstoreClient.connect(xenstored) as other:
        other.write(f"{base}/b", "1")
        other.write(f"{base}/a", "1")
    deadline = time.monotonic() + 10
    seen = []
    while len(seen) < 4 and time.monotonic() < deadline:  # each watch's first, each change
        event = client.wait_event(1)
        if event is not None:
            seen.append(event)
    assert sorted(seen) == [(f"{base}/a", "ta")] * 2 + [(f"{base}/b", "tb")] * 2
    with pytest.raises(XenstoreError) as info:
        client.watch_many([(f"{base}/c", "tc"), ("relative//bad", "tx")])
    assert info.value.errno_name == "EINVAL" and "relative//bad" in str(info.value)
