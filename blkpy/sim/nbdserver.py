"""Real NBD servers for the tests and `blkpy bench`: nbdkit and qemu-nbd on a unix socket in
a directory of the caller's, each run in the foreground as a child (so it is stopped by its
own pid), waited for with a bound, and stopped with a bound."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


class NbdServer:
    """One server process listening on ``sock``; ``start`` may be called again after
    ``stop`` (a restart on the same socket)."""

    def __init__(self, argv: list[str], sock: Path, log: Path) -> None:
        self.argv = argv
        self.sock = sock
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        """The blkpy target (QEMU's syntax)."""
        return f"nbd:unix:{self.sock}"

    @property
    def uri(self) -> str:
        """The NBD URI (qemu-img and libnbd read it)."""
        return f"nbd+unix:///?socket={self.sock}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> NbdServer:
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()  # a killed server leaves its socket behind
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}: "
                                   f"{self.log()[-1000:]}")
            if self._listening():
                return self
            time.sleep(0.02)
        self.stop(kill=True)
        raise RuntimeError(f"{self.argv[0]} did not listen on {self.sock} within "
                           f"{START_TIMEOUT_S:g} s: {self.log()[-1000:]}")

    def _listening(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.sock))
            except OSError:
                return False
        return True

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL: a crash) to our own child's pid, then wait, bounded."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT_S)

    def __enter__(self) -> NbdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def nbdkit(workdir: Path, *args: str, name: str = "nbdkit") -> NbdServer:
    """``nbdkit [options] PLUGIN [params]`` in the foreground; it exits with us."""
    sock = workdir / f"{name}.sock"
    argv = ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), *args]
    return NbdServer(argv, sock, workdir / f"{name}.log")


def qemu_nbd(workdir: Path, image: Path, fmt: str = "raw", *args: str,
             name: str = "qemu-nbd") -> NbdServer:
    """``qemu-nbd`` serving ``image`` (several clients at once: a migration has two)."""
    sock = workdir / f"{name}.sock"
    argv = ["qemu-nbd", "-k", str(sock), "-f", fmt, "--persistent", "--shared=8",
            "--cache=writeback", *args, str(image)]
    return NbdServer(argv, sock, workdir / f"{name}.log")
