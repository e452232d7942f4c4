"""The simulated xenstored: the xenstore wire protocol on a unix stream socket.

``run_xenstored`` serves in the foreground (``blkpy sim xenstored --socket PATH``) until
SIGTERM or SIGINT; ``start_xenstored``/``running_xenstored`` launch that command as a
subprocess and wait until it accepts connections. Real xenstore clients (libxenstore,
Debian's xenstore-* tools) connect through ``XENSTORED_PATH=PATH``.

Every connection is privileged dom0 unless it declares a domid with blkpy's simulation
extension, a first message CONTROL ``set-domid\\0<N>\\0`` (see ``blkpy.xenstore.daemon``);
such a connection's closing fires @releaseDomain, and a privileged CONTROL
``release\\0<N>\\0`` fires it on demand.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

from blkpy.xenstore.daemon import Connection
from blkpy.xenstore.store import Quota, Store
from blkpy.xenstore.wire import ProtocolError

log = logging.getLogger(__name__)

#: Stop reading from a client whose unsent output exceeds this (it does not read replies)...
_READ_PAUSE_BYTES = 1 << 20
#: ...and drop it when the backlog keeps growing past this (watch events pile up).
_DROP_BYTES = 16 << 20


class ServerError(Exception):
    """The server cannot start (socket path in use, not a socket, ...)."""


class _Client:
    def __init__(self, sock: socket.socket, conn: Connection) -> None:
        self.sock = sock
        self.conn = conn
        self.outbuf = bytearray()
        self.selected = selectors.EVENT_READ  # what the selector watches for


class XenstoredServer:
    """A single-threaded selector loop serving a Store to unix-socket clients."""

    def __init__(self, socket_path: str, quota: Quota | None = None) -> None:
        self.socket_path = socket_path
        self.store = Store(quota)
        _remove_stale_socket(socket_path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(socket_path)
        except OSError as err:
            self._listener.close()
            raise ServerError(f"cannot bind {socket_path}: {err.strerror}") from err
        self._inode = os.stat(socket_path).st_ino
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._clients: dict[int, _Client] = {}
        self._stopping = False

    def stop(self) -> None:
        """Ask the loop to finish (safe from signal handlers and other threads)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def serve(self) -> None:
        """Serve until stop() is called, then close everything and remove the socket."""
        try:
            while not self._stopping:
                for key, mask in self._selector.select():
                    if key.data == "listener":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    else:
                        self._service(key.data, mask)
                for client in list(self._clients.values()):
                    self._flush(client)
        finally:
            self.close()

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client, "server shutting down")
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
        self._selector.close()
        with contextlib.suppress(OSError):
            if os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:  # e.g. out of file descriptors: keep serving the others
            log.warning("accept failed: %s", err)
            return
        sock.setblocking(False)
        client = _Client(sock, Connection(self.store))
        self._clients[sock.fileno()] = client
        self._selector.register(sock, selectors.EVENT_READ, client)

    def _service(self, client: _Client, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = client.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as err:
                self._drop(client, f"read failed: {err}")
                return
            if data == b"":
                self._drop(client, "closed by client")
                return
            if data:
                try:
                    client.conn.receive(data)
                except ProtocolError as err:
                    self._drop(client, f"protocol error: {err}")
                    return
                except Exception:  # a bug must cost one connection, never the daemon
                    log.exception("internal error serving a request; dropping the client")
                    self._drop(client, "internal error")
                    return
        if mask & selectors.EVENT_WRITE:
            self._flush(client)

    def _flush(self, client: _Client) -> None:
        if client.sock.fileno() not in self._clients:
            return  # dropped earlier in this round
        # Events are taken only when the previous output is gone, so that events for a
        # slow reader coalesce in the store instead of piling up here.
        client.outbuf += client.conn.pop_output(events=not client.outbuf)
        if client.outbuf:
            try:
                sent = client.sock.send(client.outbuf)
                del client.outbuf[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as err:
                self._drop(client, f"write failed: {err}")
                return
        if len(client.outbuf) > _DROP_BYTES:
            self._drop(client, "client does not read its replies")
            return
        wanted = selectors.EVENT_WRITE if client.outbuf or client.conn.has_events() else 0
        if len(client.outbuf) < _READ_PAUSE_BYTES:
            wanted |= selectors.EVENT_READ
        wanted = wanted or selectors.EVENT_READ
        if wanted != client.selected:
            self._selector.modify(client.sock, wanted, client)
            client.selected = wanted

    def _drop(self, client: _Client, reason: str) -> None:
        fd = client.sock.fileno()
        if self._clients.pop(fd, None) is None:
            return
        log.debug("dropping connection %d (domain %d): %s", fd, client.conn.session.domid, reason)
        self._selector.unregister(client.sock)
        client.sock.close()
        client.conn.close()


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ServerError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # nobody listens: left over by a dead server
            return
    raise ServerError(f"another server is listening on {path}")


def run_xenstored(socket_path: str) -> None:
    """Serve in the foreground until SIGTERM/SIGINT, then remove the socket.

    Exits the process with a one-line message if the socket cannot be created."""
    try:
        server = XenstoredServer(socket_path)
    except ServerError as err:
        raise SystemExit(f"xenstored: {err}") from None
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda *_: server.stop())
    log.info("simulated xenstored listening on %s", socket_path)
    try:
        server.serve()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def start_xenstored(socket_path: str, timeout: float = 10.0) -> subprocess.Popen[bytes]:
    """Launch ``blkpy sim xenstored --socket socket_path`` and return once it accepts
    connections. Raises RuntimeError if it exits early, TimeoutError if it never answers."""
    command = [sys.executable, "-m", "blkpy.cli", "sim", "xenstored", "--socket", socket_path]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"simulated xenstored exited with status {proc.returncode}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(socket_path)
                return proc
            except (FileNotFoundError, ConnectionRefusedError):
                pass
        if time.monotonic() > deadline:
            stop_xenstored(proc)
            raise TimeoutError(f"simulated xenstored did not listen on {socket_path}")
        time.sleep(0.02)


def stop_xenstored(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """SIGTERM (then SIGKILL after ``timeout``) and reap; returns the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def running_xenstored(socket_path: str, timeout: float = 10.0) -> Iterator[subprocess.Popen[bytes]]:
    """``with running_xenstored(path) as proc:`` a simulated xenstored for the block."""
    proc = start_xenstored(socket_path, timeout)
    try:
        yield proc
    finally:
        stop_xenstored(proc)
