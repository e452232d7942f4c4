"""The simulated xenstored as a process: lifecycle, socket handling, hostile clients."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from blkpy.xenstore.client import XenstoreClient
from blkpy.xenstore.server import start_xenstored, stop_xenstored
from blkpy.xenstore.wire import Decoder, MsgType, encode_message, join_strings


def raw_connect(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def raw_exchange(sock, data):
    """Send bytes, return the first whole message that comes back."""
    sock.sendall(data)
    decoder = Decoder()
    while True:
        chunk = sock.recv(65536)
        assert chunk, "server closed the connection"
        messages = decoder.feed(chunk)
        if messages:
            return messages[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_removes_the_socket(socket_dir, signum):
    path = os.path.join(socket_dir, "socket")
    proc = start_xenstored(path)
    try:
        client = XenstoreClient.connect(path)
        client.write("/x", "1")
        proc.send_signal(signum)
        assert proc.wait(10) == 0
        assert not os.path.exists(path)
        with pytest.raises(ConnectionError, match="closed the connection"):
            client.read("/x")
        with pytest.raises(ConnectionError):
            client.events()  # stays broken
    finally:
        stop_xenstored(proc)


def test_stale_socket_file_is_replaced(socket_dir):
    path = os.path.join(socket_dir, "socket")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # bound, never listening, then abandoned
    stale.close()
    proc = start_xenstored(path)
    try:
        with XenstoreClient.connect(path) as client:
            assert client.directory("/") == ["local", "tool"]
    finally:
        assert stop_xenstored(proc) == 0


def run_cli(path):
    command = [sys.executable, "-m", "blkpy.cli", "sim", "xenstored", "--socket", path]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def test_refuses_a_path_that_is_not_a_socket(socket_dir):
    path = os.path.join(socket_dir, "file")
    with open(path, "w") as f:
        f.write("precious")
    result = run_cli(path)
    assert result.returncode != 0 and "not a socket" in result.stderr
    with open(path) as f:
        assert f.read() == "precious"


def test_refuses_a_socket_another_server_listens_on(xenstored, client, base):
    result = run_cli(xenstored)
    assert result.returncode != 0 and "listening" in result.stderr
    client.write(base, "still served")
    assert client.read(base) == b"still served"


def test_oversized_message_drops_only_that_connection(xenstored, client, base):
    bad = raw_connect(xenstored)
    bad.sendall(encode_message(MsgType.READ, 1, 0, b"")[:12] + (5000).to_bytes(4, "little"))
    assert bad.recv(100) == b""  # closed by the server
    bad.close()
    client.write(base, "alive")
    assert client.read(base) == b"alive"


def test_malformed_requests_get_error_replies(xenstored, client, base):
    sock = raw_connect(xenstored)
    reply = raw_exchange(sock, encode_message(4242, 9, 0, b"junk"))
    assert (reply.type, reply.req_id, reply.payload) == (MsgType.ERROR, 9, b"ENOSYS\0")
    reply = raw_exchange(sock, encode_message(MsgType.READ, 10, 0, b"no-terminator"))
    assert (reply.type, reply.payload) == (MsgType.ERROR, b"EINVAL\0")
    reply = raw_exchange(sock, encode_message(MsgType.READ, 11, 55, b"/\0"))
    assert (reply.type, reply.tx_id, reply.payload) == (MsgType.ERROR, 55, b"ENOENT\0")
    sock.sendall(encode_message(MsgType.WRITE, 12, 0, b"/half\0")[:10])  # then vanish
    sock.close()
    client.write(base, "alive")
    assert client.read(base) == b"alive"


def test_guest_disconnect_fires_release_domain(xenstored, client):
    client.watch("@releaseDomain", "rel")
    assert client.wait_event(10) == ("@releaseDomain", "rel")  # initial fire
    guest = XenstoreClient.connect(xenstored, domid=7)
    guest.close()
    assert client.wait_event(10) == ("@releaseDomain", "rel")
    client.control("release", "8")
    assert client.wait_event(10) == ("@releaseDomain", "rel")
    client.unwatch("@releaseDomain", "rel")


def test_many_clients(xenstored, base):
    clients = [XenstoreClient.connect(xenstored) for _ in range(20)]
    for i, c in enumerate(clients):
        c.write(f"{base}/{i}", str(i))
    assert sorted(clients[0].directory(base), key=int) == [str(i) for i in range(20)]
    for c in clients:
        c.close()


def test_a_client_that_does_not_read_is_not_served_forever(xenstored, client, base):
    flood = raw_connect(xenstored)
    flood.setblocking(False)
    request = encode_message(MsgType.READ, 1, 0, join_strings("/"))
    sent = 0
    try:
        for _ in range(20000):
            sent += flood.send(request * 64)
    except BlockingIOError:
        pass  # the server stopped reading from us: backpressure works
    flood.close()
    assert sent > 0
    client.write(base, "alive")
    assert client.read(base) == b"alive"
