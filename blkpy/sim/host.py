"""A simulated Xen host: the sim hypervisor directory, a simulated xenstored, a toolstack
that adds and removes disks like libxl, and `blkpy serve` backends as real subprocesses.

The guest side (SimGuest + the simulated blkfront) runs in the caller's process, so a test
or `blkpy sim run` drives the same two-process arrangement as dom0 and a domU on Xen.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from blkpy.sim import toolstack
from blkpy.sim.guest import SimGuest
from blkpy.sim.hypervisor import SIM_DIR_ENV, create_sim_dir, remove_sim_dir
from blkpy.xenbus import XenbusState, parse_state
from blkpy.xenstore.client import XenstoreClient
from blkpy.xenstore.server import start_xenstored, stop_xenstored


class BackendProcess:
    """A `blkpy serve` subprocess for one disk."""

    def __init__(self, spec: toolstack.DiskSpec, proc: subprocess.Popen[bytes],
                 log_path: Path, stats_path: Path) -> None:
        self.spec = spec
        self.proc = proc
        self.log_path = log_path
        self.stats_path = stats_path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stats(self) -> dict[str, object]:
        """Counters the backend wrote (refreshed through SIGUSR1 while it runs)."""
        if self.proc.poll() is None:
            with contextlib.suppress(FileNotFoundError):
                self.stats_path.unlink()
            self.proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while not self.stats_path.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        try:
            return json.loads(self.stats_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class SimHost:
    """Context manager owning every process and file of one simulated host."""

    def __init__(self, serve_args: list[str] | None = None) -> None:
        self.sim_dir = create_sim_dir()
        self.socket = os.path.join(self.sim_dir, "xenstored.sock")
        self.serve_args = serve_args or []
        self.xenstored: subprocess.Popen[bytes] | None = None
        self.xs: XenstoreClient | None = None
        self.backends: list[BackendProcess] = []
        self.guests: dict[int, SimGuest] = {}

    def __enter__(self) -> SimHost:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.xenstored = start_xenstored(self.socket)
        self.xs = XenstoreClient.connect(self.socket)
        self.xs.write("/local/domain/0/name", "Domain-0")
        self.xs.write("/local/domain/0/domid", "0")

    def env(self) -> dict[str, str]:
        return {**os.environ, "XENSTORED_PATH": self.socket, SIM_DIR_ENV: self.sim_dir}

    # ---- guests ------------------------------------------------------------------------

    def create_guest(self, domid: int, memory_pages: int = 16384,
                     grant_entries: int = 32768) -> SimGuest:
        """A guest with enough grant entries for deep queues of 1 MiB requests."""
        assert self.xs is not None
        guest = SimGuest(self.sim_dir, domid, memory_pages=memory_pages,
                         grant_entries=grant_entries)
        base = f"/local/domain/{domid}"
        self.xs.write(f"{base}/name", f"sim-guest-{domid}")
        self.xs.write(f"{base}/domid", str(domid))
        self.xs.set_perms(base, [f"n{domid}", "r0"])
        self.xs.mkdir(f"{base}/device")
        self.xs.set_perms(f"{base}/device", [f"n{domid}", "r0"])
        self.guests[domid] = guest
        return guest

    def guest_xenstore(self, domid: int) -> XenstoreClient:
        """An unprivileged xenstore connection of guest ``domid``."""
        return XenstoreClient.connect(self.socket, domid=domid)

    def destroy_guest(self, domid: int) -> None:
        guest = self.guests.pop(domid, None)
        if guest is not None:
            guest.close()
        assert self.xs is not None
        with contextlib.suppress(Exception):
            self.xs.control("release", str(domid))

    # ---- disks -------------------------------------------------------------------------

    def add_disk(self, spec: toolstack.DiskSpec, start_backend: bool = True) -> BackendProcess | None:
        """Write the nodes in one transaction (as libxl does) and start the backend."""
        assert self.xs is not None
        xs = self.xs
        backend, frontend = toolstack.disk_nodes(spec)

        def write(tx: int) -> None:
            for d in (backend, frontend):
                xs.mkdir(d.path, tx=tx)
                xs.set_perms(d.path, d.perms, tx=tx)
                for name, value in d.nodes.items():
                    xs.write(f"{d.path}/{name}", value, tx=tx)

        xs.run_transaction(write)
        if not start_backend:
            return None
        return self.start_backend(spec)

    def start_backend(self, spec: toolstack.DiskSpec, extra_args: list[str] | None = None,
                      env: dict[str, str] | None = None) -> BackendProcess:
        """`blkpy serve` for ``spec`` (``extra_args`` after the host's own serve args,
        e.g. --resume for a successor; ``env`` added to its environment)."""
        tag = f"{spec.frontend_domid}-{spec.devid}-{len(self.backends)}"
        log_path = Path(self.sim_dir) / f"serve-{tag}.log"
        stats_path = Path(self.sim_dir) / f"serve-{tag}.stats.json"
        rel = f"backend/{spec.kind}/{spec.frontend_domid}/{spec.devid}"
        cmd = [sys.executable, "-m", "blkpy", "serve", rel, "--platform", "sim",
               "--xenstore", self.socket, "--sim-dir", self.sim_dir,
               "--stats-file", str(stats_path), *self.serve_args, *(extra_args or [])]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env={**self.env(), **(env or {})})
        backend = BackendProcess(spec, proc, log_path, stats_path)
        self.backends.append(backend)
        return backend

    def backend_state(self, spec: toolstack.DiskSpec) -> XenbusState | None:
        assert self.xs is not None
        return parse_state(self.xs.read_str(f"{spec.backend_path}/state"))

    def wait_backend_state(self, spec: toolstack.DiskSpec, state: XenbusState,
                           timeout: float = 10.0) -> bool:
        """Wait until the backend writes ``state``; gives up early if its process died."""
        procs = [b.proc for b in self.backends if b.spec == spec]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.backend_state(spec) == state:
                return True
            if procs and all(p.poll() is not None for p in procs):
                return self.backend_state(spec) == state
            time.sleep(0.01)
        return False

    def remove_disk(self, spec: toolstack.DiskSpec, timeout: float = 10.0) -> bool:
        """libxl's removal: online=0 + Closing, wait (10 s) for Closed, delete the nodes.
        Returns whether the backend reached Closed in time."""
        assert self.xs is not None
        xs = self.xs
        nodes = toolstack.removal_nodes(self.backend_state(spec))

        def write(tx: int) -> None:
            for name, value in nodes.items():
                xs.write(f"{spec.backend_path}/{name}", value, tx=tx)

        xs.run_transaction(write)
        closed = self.wait_backend_state(spec, XenbusState.CLOSED, timeout)
        xs.rm(spec.frontend_path)
        xs.rm(spec.backend_path)
        return closed

    def close(self) -> None:
        for backend in self.backends:
            backend.stop()
        for domid in list(self.guests):
            self.destroy_guest(domid)
        if self.xs is not None:
            self.xs.close()
            self.xs = None
        if self.xenstored is not None:
            stop_xenstored(self.xenstored)
            self.xenstored = None
        remove_sim_dir(self.sim_dir)
