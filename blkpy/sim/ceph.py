"""A throwaway single-node Ceph cluster (one monitor, one memstore OSD) for the RBD tests
and benchmark, from Debian's ceph-mon/ceph-osd/ceph-common.

Everything lives in one temporary directory with its own ``ceph.conf``: no
authentication, loopback only, the monitor on a port picked free at start (two clusters
on one machine do not collide), data in the OSD's memory (memstore, bounded by
``memstore_bytes``). No manager daemon: RBD I/O does not need one. The daemons run in the
foreground as children of this process and are stopped by their pids, never by name.

    with MicroCeph() as ceph:                    # ~7 s on 2 cores (see README)
        ceph.rbd("create", "--size", "64M", "rbd/img")
        target = f"rbd:rbd/img:conf={ceph.conf}"
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

#: what the cluster needs installed (Debian packages ceph-mon, ceph-osd, ceph-common)
BINARIES = ("ceph-mon", "ceph-osd", "monmaptool", "ceph", "rados", "rbd")
POOL = "rbd"


class CephUnavailable(Exception):
    """The Ceph packages are not installed (tests skip with this reason)."""


class CephStartError(Exception):
    """The cluster did not come up in time (the message carries the daemons' log tails)."""


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies, so a test
    run killed outright leaves no daemon behind (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CONF = """\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{port}
public addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool delete = true
mon data avail crit = 0
mon warn on pool no redundancy = false
run dir = {root}/run
log file = {root}/log/$name.log
admin socket = {root}/run/$name.asok
pid file = {root}/run/$name.pid
# the clients and tools of the tests give up instead of waiting the default 300 s
client mount timeout = 30
[mon.a]
mon data = {root}/mon
[osd.0]
osd data = {root}/osd
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
# small: two cores are shared with the backend under test and the guest model
osd op num shards = 2
osd op num threads per shard = 1
"""


class MicroCeph:
    """Start with ``start()`` (or ``with``), stop with ``stop()``; ``conf`` is the path a
    client passes as ``conf=`` (librados) or ``--conf`` (ceph, rbd)."""

    def __init__(self, memstore_bytes: int = 1 << 30, timeout: float = 60.0,
                 root: str | None = None) -> None:
        if missing_binaries():
            raise CephUnavailable("Ceph is not installed (missing " +
                                  ", ".join(missing_binaries()) + "; ./setup.sh installs it)")
        self._own_root = root is None
        # short: the admin sockets are AF_UNIX paths (107 bytes at most)
        self.root = Path(root or tempfile.mkdtemp(prefix="blkpy-ceph-"))
        self.conf = str(self.root / "ceph.conf")
        self.memstore_bytes = memstore_bytes
        self.timeout = timeout
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.start_seconds = 0.0
        self.mon_port = 0

    # ---- commands ------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment for Ceph's tools: this cluster's conf and nothing from the host's."""
        return {**os.environ, "CEPH_CONF": self.conf}

    def run(self, *args: str, timeout: float = 60.0, check: bool = True,
            stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
        """Run a Ceph command-line tool against this cluster."""
        cmd = [args[0], "--conf", self.conf, *args[1:]]
        proc = subprocess.run(cmd, env=self.env(), stdout=stdout, stderr=subprocess.PIPE,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def ceph(self, *args: str, timeout: float = 60.0) -> str:
        return self.run("ceph", *args, timeout=timeout).stdout.decode()

    def rbd(self, *args: str, timeout: float = 120.0) -> str:
        return self.run("rbd", *args, timeout=timeout).stdout.decode()

    # ---- life cycle ------------------------------------------------------------------

    def start(self) -> MicroCeph:
        t0 = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _start(self) -> None:
        deadline = time.monotonic() + self.timeout
        for sub in ("run", "log", "mon", "osd"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        fsid, port = str(uuid.uuid4()), _free_port()
        self.mon_port = port
        Path(self.conf).write_text(_CONF.format(fsid=fsid, port=port, root=self.root,
                                                memstore_bytes=self.memstore_bytes))
        # A monmap naming mon.a at our port: one generated from "mon host" alone names
        # its entry after the address, and mon.a then waits to join a cluster forever.
        monmap = str(self.root / "monmap")
        self._tool("monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                   f"[v2:127.0.0.1:{port}]", monmap, deadline=deadline)
        self._tool("ceph-mon", "--id", "a", "--mkfs", "--monmap", monmap, "--keyring",
                   "/dev/null", deadline=deadline)
        (self.root / "mon" / "keyring").touch()
        self._daemon("mon.a", "ceph-mon", "--id", "a")
        osd_id = self._ceph("osd", "create", deadline=deadline).strip()
        if osd_id != "0":
            raise CephStartError(f"ceph osd create gave id {osd_id!r}, expected 0")
        self._ceph("osd", "crush", "add", "osd.0", "1", "root=default", deadline=deadline)
        self._tool("ceph-osd", "--id", "0", "--mkfs", deadline=deadline)
        self._daemon("osd.0", "ceph-osd", "--id", "0")
        self._ceph("osd", "pool", "create", POOL, "8", deadline=deadline)
        self._ceph("osd", "pool", "application", "enable", POOL, "rbd", deadline=deadline)
        # The pool serves I/O once its placement groups have peered. Without a manager
        # no command reports PG states, so one client write waits for that instead.
        self._tool("rados", "-p", POOL, "create", "blkpy-probe", deadline=deadline)

    def _remaining(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CephStartError(f"cluster not up within {self.timeout:.0f} s"
                                 + self._log_tails())
        return left

    def _tool(self, *args: str, deadline: float) -> str:
        try:
            proc = self.run(*args, timeout=self._remaining(deadline), check=False)
        except subprocess.TimeoutExpired:
            raise CephStartError(f"{' '.join(args[:3])} timed out" + self._log_tails()) from None
        if proc.returncode != 0:
            raise CephStartError(f"{' '.join(args)} failed: "
                                 f"{proc.stderr.decode(errors='replace').strip()[-500:]}"
                                 + self._log_tails())
        return proc.stdout.decode()

    def _ceph(self, *args: str, deadline: float) -> str:
        self._check_alive()
        return self._tool("ceph", "--connect-timeout",
                          str(max(1, int(self._remaining(deadline)))), *args,
                          deadline=deadline)

    def _daemon(self, name: str, binary: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 - the child's
        with log:
            # -f: stay in the foreground, so the pid we hold is the daemon's; own session:
            # a Ctrl-C in the test's terminal is for pytest, which then stops us by pid.
            self.procs[name] = subprocess.Popen(
                [binary, "--conf", self.conf, "-f", *args], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True,
                preexec_fn=_die_with_parent)

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise CephStartError(f"{name} exited with status {proc.returncode}"
                                     + self._log_tails())

    def _log_tails(self) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").strip().splitlines()[-5:]
                if tail:
                    out.append(f"\n--- {path.name}:\n" + "\n".join(tail))
        return "".join(out)

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM each daemon by pid (OSD first), SIGKILL what outlives ``timeout``, then
        remove the directory (memstore data dies with the OSD)."""
        # One at a time, OSD first: an OSD whose monitor is gone takes longer to leave.
        for name in sorted(self.procs, key=lambda n: not n.startswith("osd")):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> MicroCeph:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
