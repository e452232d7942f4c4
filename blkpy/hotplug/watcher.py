"""`blkpy hotplug daemon`: one process that starts a `blkpy serve` per blkpy disk.

libxl waits (10 s) for the backend's InitWait before it runs the hotplug script, so the
process that answers must already be running when ``xl create`` writes the device: like
XenServer's tapback, this watcher watches ``/local/domain/<self>/backend/vbd`` (phy disks)
and ``.../backend/vbd3`` (backendtype=tap since Xen 4.19, which xen-blkback leaves alone)
and, for each new device whose ``script`` node names a ``block-blkpy*`` script, spawns
``blkpy serve backend/<kind>/<domid>/<devid>`` as a child. Devices with other scripts are left
alone (another backend may serve them). It reaps children and logs how they ended; when a
device's backend directory disappears while its serve still runs (a forced removal skips the
hotplug ``remove``), it terminates that serve; when a connected device's serve dies, it
starts a successor that takes the rings over (``--resume``). On SIGTERM/SIGINT it stops
every child and exits.

By default a serve is not exec'd but forked from the watcher, which has imported serve's
modules once: under emulation a fresh Python needs many seconds to import numpy and the data
path, more than libxl's 10 s wait for InitWait when several disks start at once. The forked
child runs exactly what ``blkpy serve`` runs (the same click command). ``--serve-command``
execs a command instead.

A forked serve's device also gets a standby: a second child, forked once the serve has run
for a moment, that has done all a successor can do before its predecessor is gone (the
fork's copying, the command line, logging, the platform's devices, its own xenstore
connection) and waits on a pipe. When the serve dies the watcher, woken by SIGCHLD, writes
one byte and the standby takes the device over (``--resume``); the guest's wait is the
takeover itself, not a process start. The standby is not a serve: its command line says
``blkpy standby``. Closing its pipe (device gone, watcher stopping or gone) ends it. A
device whose standbys keep failing (a broken install, no memory) gets none for a while; its
serve runs on, and is succeeded by a serve forked at its death.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import gc
import logging
import os
import posixpath
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from blkpy.defaults import EXIT_HANDED_OVER, EXIT_TAKEOVER_FAILED
from blkpy.hotplug import BACKEND_KINDS, SCRIPT_NAME
from blkpy.ratelimit import WindowBudget
from blkpy.xenstore.client import XenstoreClient

log = logging.getLogger("blkpy.hotplug.daemon")

WATCH_TOKEN = "blkpy-hotplug-devices"
#: a serve whose device vanished gets this long to notice by itself before SIGTERM
ORPHAN_GRACE_S = 5.0
STOP_GRACE_S = 10.0
#: successors per device within RESTART_WINDOW_S before the daemon gives up on it; and
#: failed standbys per device before it forks none until the window has passed
RESTART_BUDGET = 5
RESTART_WINDOW_S = 60.0
#: an upgrade's new serve loads (a fresh interpreter: seconds of CPU, ~50x more under
#: emulation) at this niceness, so that the serve it replaces keeps the CPU meanwhile; it
#: takes its predecessor's priority before the hand-over
LOAD_NICENESS = 10
#: a device's standby is forked once its serve has run this long: not while the serve
#: starts or takes over, which need the CPU first
STANDBY_DELAY_S = 2.0


def is_blkpy_script(script: str | None) -> bool:
    return bool(script) and posixpath.basename(script.strip()).startswith(SCRIPT_NAME)


class ForkedServe:
    """A serve forked from the watcher, with the part of Popen's interface used here."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def set_cmdline(argv: list[str]) -> bool:
    """Rewrite this process's /proc/<pid>/cmdline in place (within its original length), so
    a forked serve shows as `blkpy serve <backend path>` to ps, pgrep and the hotplug
    ``remove``, which checks that a pid still belongs to the device's serve."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        # fields after "pid (comm)" start at field 3; arg_start/arg_end are fields 48/49
        start, end = int(fields[48 - 3]), int(fields[49 - 3])
        data = b"\0".join(a.encode() for a in argv) + b"\0"
        if len(data) > end - start:
            return False
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            mem.write(data.ljust(end - start, b"\0"))
        return True
    except (OSError, IndexError, ValueError):
        return False


def _serve_in_child(argv: list[str], log_path: Path | None, inherited: list[int],
                    title: list[str] | None = None) -> NoReturn:
    """Body of a forked serve: detach from the watcher, then run the `blkpy` CLI on argv
    (``title``: the command line ps shows instead of ``blkpy`` + argv)."""
    code = 1
    try:
        set_cmdline(title or ["blkpy", *argv])
        os.setsid()
        signal.set_wakeup_fd(-1)
        for fd in inherited:  # the watcher's xenstore connection, pipes... are not ours
            os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if log_path is not None:
            out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(out)
        logging.root.handlers.clear()  # serve configures its own logging
        from blkpy.cli import main

        main(args=argv, prog_name="blkpy", standalone_mode=True)
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _how(status: int) -> str:
    """How a child ended, from its Popen-style return code."""
    return f"exit status {status}" if status >= 0 else f"signal {-status}"


def _lower_priority() -> None:
    os.nice(LOAD_NICENESS)


def preload_serve() -> None:
    """Import what a forked serve needs, once, in the watcher (the image formats too: a
    successor would import them while the guest waits), then freeze what is loaded: the
    collector of a forked child then leaves those objects alone instead of copying every
    page they live on."""
    try:
        import blkpy.cli  # noqa: F401
        import blkpy.gntdev.linux  # noqa: F401
        import blkpy.serve  # noqa: F401
        from blkpy.backends import load_format

        for fmt in ("raw", "qcow2"):
            load_format(fmt)
    except ImportError as exc:  # the child will report it properly
        log.warning("cannot preload serve's modules: %s", exc)
    gc.collect()
    gc.freeze()


@dataclasses.dataclass
class Standby:
    """A device's ready successor, waiting for its word on a pipe."""

    proc: ForkedServe
    go: int  # the pipe's write end: b"g" = take over; closed = not needed


@dataclasses.dataclass
class Child:
    relpath: str  # backend/vbd/<domid>/<devid> (or backend/vbd3/...)
    proc: subprocess.Popen[bytes] | ForkedServe
    started: float
    orphaned_at: float | None = None  # when its backend directory disappeared
    signalled: bool = False


class DeviceWatcher:
    """Keeps one serve child per blkpy device under ``/local/domain/<domid>/backend/vbd``
    and ``.../backend/vbd3``."""

    def __init__(self, xs: XenstoreClient, *, domid: int = 0,
                 serve_command: Sequence[str] | None = None,
                 serve_args: Sequence[str] = (), log_dir: str | None = None,
                 orphan_grace: float = ORPHAN_GRACE_S,
                 standby_delay: float | None = STANDBY_DELAY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``standby_delay`` None: no standby successors (they exist only for forked
        serves). ``clock``: the time RESTART_WINDOW_S is measured in."""
        self.xs = xs
        self.domid = domid
        self.roots = {kind: f"/local/domain/{domid}/backend/{kind}" for kind in BACKEND_KINDS}
        #: None: fork serves from this process; else exec this command + backend path
        self.serve_command = list(serve_command) if serve_command else None
        self.serve_args = list(serve_args)
        self.log_dir = Path(log_dir) if log_dir else None
        self.orphan_grace = orphan_grace
        self.children: dict[str, Child] = {}
        # devices already handled (served, or not ours): never started twice, even if their
        # serve died, until their backend directory goes away
        self.seen: set[str] = set()
        self.stopping = False
        #: successors started, per device (a crash loop is stopped)
        self.restarts = WindowBudget(RESTART_BUDGET, RESTART_WINDOW_S, clock)
        self.standby_delay = standby_delay if self.serve_command is None else None
        self.standbys: dict[str, Standby] = {}
        #: standbys that could not be forked or ended unasked, per device: one that fails at
        #: once must not be forked again on every pass of the loop
        self.standby_failures = WindowBudget(RESTART_BUDGET, RESTART_WINDOW_S, clock)
        #: when a device's standbys were last reported as given up (one line per window)
        self._standby_notices = WindowBudget(1, RESTART_WINDOW_S, clock)
        #: standbys told to go, by pid: (device, process, since when)
        self.retired: dict[int, tuple[str, ForkedServe, float]] = {}
        #: SIGCHLD's wake-up pipe (read end, write end) while ``run`` runs
        self._wake: tuple[int, int] | None = None

    # ---- scanning -------------------------------------------------------------------------

    def current_devices(self) -> set[str]:
        found = set()
        for kind, root in self.roots.items():
            for domid in self.xs.children(root):  # may vanish between two reads
                for devid in self.xs.children(f"{root}/{domid}"):
                    found.add(f"backend/{kind}/{domid}/{devid}")
        return found

    def scan(self) -> None:
        present = self.current_devices()
        for rel in sorted(present - self.seen):
            script = self.xs.read_str(f"/local/domain/{self.domid}/{rel}/script")
            if script is None:
                continue  # libxl writes all nodes in one transaction; not complete yet
            self.seen.add(rel)
            if is_blkpy_script(script):
                self.start(rel)
            else:
                log.debug("%s: script %s is not ours; ignored", rel, script)
        now = time.monotonic()
        for rel in self.seen - present:
            self.seen.discard(rel)
            child = self.children.get(rel)
            self.cancel_standby(rel)
            if child is not None and child.orphaned_at is None:
                child.orphaned_at = now
                log.info("%s: backend directory removed; serve pid %d has %.0f s to exit",
                         rel, child.proc.pid, self.orphan_grace)

    # ---- children -------------------------------------------------------------------------

    def check_restart_requests(self) -> None:
        """`blkpy hotplug restart` asks by writing ``blkpy-restart`` under the device:
        start a successor from the code on disk that replaces the running serve."""
        for rel, child in list(self.children.items()):
            if "#" in rel or child.orphaned_at is not None:
                continue
            node = f"/local/domain/{self.domid}/{rel}/blkpy-restart"
            if self.xs.read_str(node) is None:
                continue
            self.xs.rm(node)
            log.info("%s: upgrade: a new serve replaces pid %d", rel, child.proc.pid)
            self.start(rel, fresh=True, extra=["--replace", str(child.proc.pid)])

    def start(self, rel: str, resume: bool = False, fresh: bool = False,
              extra: list[str] | None = None) -> None:
        """Start the serve of ``rel``; ``resume``: a successor taking the device over;
        ``fresh``: exec a new interpreter (an upgrade runs the code now on disk) even
        where serves are forked."""
        log_path = self._log_path(rel)
        try:
            proc = self._spawn(rel, log_path, (["--resume"] if resume else []) + (extra or []),
                               fresh)
        except OSError as exc:
            log.error("%s: cannot start serve: %s", rel, exc.strerror)
            return
        old = self.children.pop(rel, None)
        if old is not None:  # the device was re-created while its old serve still exits
            self.children[f"{rel}#{old.proc.pid}"] = old
        self.children[rel] = Child(rel, proc, time.monotonic())
        log.info("%s: started serve pid %d", rel, proc.pid)

    def _log_path(self, rel: str) -> Path | None:
        if self.log_dir is None:
            return None
        return self.log_dir / ("serve-" + rel.replace("backend/vbd/", "")
                               .replace("backend/", "").replace("/", "-") + ".log")

    def _spawn(self, rel: str, log_path: Path | None, extra: list[str],
               fresh: bool) -> subprocess.Popen[bytes] | ForkedServe:
        if self.serve_command is None and not fresh:
            return self._fork(["serve", rel, *self.serve_args, *extra], log_path)
        command = self.serve_command or [sys.executable, "-m", "blkpy", "serve"]
        stderr = open(log_path, "ab") if log_path else None  # noqa: SIM115 - the child's
        # (only where the serve can raise its priority again: root)
        lower = fresh and "--replace" in extra and os.geteuid() == 0
        try:
            return subprocess.Popen([*command, rel, *self.serve_args, *extra],
                                    stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                    start_new_session=True,
                                    preexec_fn=_lower_priority if lower else None)
        finally:
            if stderr is not None:
                stderr.close()

    def _fork(self, argv: list[str], log_path: Path | None, also_close: tuple[int, ...] = (),
              title: list[str] | None = None) -> ForkedServe:
        """Fork a child that runs the `blkpy` CLI on argv (``_serve_in_child``), closing
        the watcher's private descriptors and ``also_close``."""
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _serve_in_child(argv, log_path, [*self._private_fds(), *also_close], title)
        return ForkedServe(pid)

    def _private_fds(self) -> list[int]:
        """The watcher's descriptors a forked child must close: its xenstore connection,
        SIGCHLD's pipe, the standbys' pipes (a standby must see its pipe's end when the
        watcher closes it)."""
        return [self.xs.fileno(), *(self._wake or ()), *(s.go for s in self.standbys.values())]

    # ---- standbys ---------------------------------------------------------------------------

    def start_standbys(self) -> None:
        """Fork a standby for each device whose serve has run STANDBY_DELAY_S without one."""
        if self.standby_delay is None or self.stopping:
            return
        now = time.monotonic()
        for rel, child in self.children.items():
            if ("#" in rel or rel in self.standbys or child.orphaned_at is not None
                    or now - child.started < self.standby_delay or child.proc.poll() is not None
                    or self.standby_failures.spent(rel)):
                continue
            self._fork_standby(rel)

    def _fork_standby(self, rel: str) -> None:
        log_path = self._log_path(rel)
        read_end, go = os.pipe2(os.O_CLOEXEC)
        os.set_inheritable(read_end, True)  # the standby's (ours is closed once forked)
        try:
            proc = self._fork(["serve", rel, *self.serve_args, "--resume",
                               "--standby-fd", str(read_end)], log_path, (go,),
                              title=["blkpy", "standby", rel])
        except OSError as exc:
            os.close(read_end)
            os.close(go)
            log.error("%s: cannot fork a standby: %s", rel, exc.strerror)
            self._standby_failed(rel)
            return
        os.close(read_end)
        self.standbys[rel] = Standby(proc, go)
        log.debug("%s: standby pid %d", rel, proc.pid)

    def _standby_failed(self, rel: str) -> None:
        """Count a standby that could not be forked or ended unasked (a woken or cancelled
        one is no failure); say once when the device gets no more for a while."""
        failures = self.standby_failures
        failures.charge(rel)
        if failures.spent(rel) and not self._standby_notices.spent(rel):
            self._standby_notices.charge(rel)
            log.error("%s: %d standbys failed within %.0f s; none for %.0f s (the serve runs "
                      "on; if it dies, a successor is forked then)", rel, failures.used(rel),
                      failures.window, failures.reopens_in(rel))

    def cancel_standby(self, rel: str) -> None:
        """The device needs no standby any more: close its pipe (it exits)."""
        standby = self.standbys.pop(rel, None)
        if standby is None:
            return
        os.close(standby.go)
        # It exits when it reads the pipe's end, which may be some time away if it is still
        # getting ready: never a signal (a standby is no serve, and a lab or operator reads
        # "ended (signal" in this log as a crash); SIGKILL only if it hangs.
        self.retired[standby.proc.pid] = (rel, standby.proc, time.monotonic())

    def reap_retired(self, wait: float = ORPHAN_GRACE_S + STOP_GRACE_S) -> None:
        now = time.monotonic()
        for pid, (rel, proc, since) in list(self.retired.items()):
            status = proc.poll()
            if status is None and now - since > wait:
                log.error("%s: standby pid %d did not exit; SIGKILL", rel, pid)
                proc.kill()
                status = proc.wait()
            if status is not None:
                del self.retired[pid]
                log.debug("%s: standby pid %d gone (status %d)", rel, pid, status)

    def _wake_standby(self, rel: str) -> ForkedServe | None:
        """Tell the device's standby to take over; its process, or None if it has none
        (or it is gone)."""
        standby = self.standbys.pop(rel, None)
        if standby is None:
            return None
        try:
            os.write(standby.go, b"g")
        except OSError:  # it died (BrokenPipeError) before a pass of reap saw it
            standby.proc.kill()
            log.warning("%s: standby pid %d ended (%s)", rel, standby.proc.pid,
                        _how(standby.proc.wait()))
            self._standby_failed(rel)
            return None
        finally:
            os.close(standby.go)
        return standby.proc

    # ---- reaping ----------------------------------------------------------------------------

    def reap(self) -> None:
        self.reap_retired()
        for rel, standby in list(self.standbys.items()):
            status = standby.proc.poll()
            if status is not None:  # it should only wait: something is wrong with it
                log.warning("%s: standby pid %d ended (%s)", rel, standby.proc.pid, _how(status))
                del self.standbys[rel]
                os.close(standby.go)
                self._standby_failed(rel)
        for rel, child in list(self.children.items()):
            status = child.proc.poll()
            if status is None:
                continue
            del self.children[rel]
            level = logging.INFO if status in (0, EXIT_HANDED_OVER) else logging.WARNING
            self._supervise(rel, child, status, functools.partial(
                log.log, level, "%s: serve pid %d ended (%s) after %.1f s", rel,
                child.proc.pid, _how(status), time.monotonic() - child.started))

    def _supervise(self, rel: str, child: Child, status: int,
                   report: Callable[[], None]) -> None:
        """A serve that ended while its device is still connected (a crash, a kill, an
        upgrade hand-over) gets a successor that takes the rings over from their journals;
        the guest sees a pause, not a state change. A clean exit (device removed, frontend
        gone), a serve that never connected and a failed takeover get none, nor a device
        whose serves keep dying. ``report`` logs the end, once on every path: after a
        standby's word, which the guest waits for (under emulation a log line costs ms)."""
        if "#" in rel or self.stopping:
            report()
            return
        if not self._needs_successor(rel, child, status):
            report()
            self.cancel_standby(rel)
            return
        # an upgrade's hand-over is asked for: never refused, but counted
        if status != EXIT_HANDED_OVER and self.restarts.spent(rel):
            report()
            log.error("%s: %d serves died within %.0f s; not starting another", rel,
                      self.restarts.used(rel), RESTART_WINDOW_S)
            self.cancel_standby(rel)
            return
        self.restarts.charge(rel)
        if status != EXIT_HANDED_OVER:  # a crash: the standby is ready (a hand-over that
            proc = self._wake_standby(rel)  # nobody asked for gets the code on disk)
            if proc is not None:
                self.children[rel] = Child(rel, proc, time.monotonic())
                report()
                log.info("%s: standby pid %d takes the device over", rel, proc.pid)
                return
        report()
        log.info("%s: starting a successor to take the device over", rel)
        self.start(rel, resume=True, fresh=status == EXIT_HANDED_OVER)

    def _needs_successor(self, rel: str, child: Child, status: int) -> bool:
        if (child.orphaned_at is not None or rel not in self.seen
                or status in (0, EXIT_TAKEOVER_FAILED)):
            return False
        state = (self.xs.read_str(f"/local/domain/{self.domid}/{rel}/state") or "").strip()
        # never connected (e.g. it could not open its image): nothing to keep
        return state == "4"

    def terminate_orphans(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.orphaned_at is None:
                continue
            age = now - child.orphaned_at
            if not child.signalled and age > self.orphan_grace:
                log.warning("%s: serve pid %d outlived its device; SIGTERM", child.relpath,
                            child.proc.pid)
                child.proc.send_signal(signal.SIGTERM)
                child.signalled = True
            elif child.signalled and age > self.orphan_grace + STOP_GRACE_S:
                log.error("%s: serve pid %d ignores SIGTERM; SIGKILL", child.relpath,
                          child.proc.pid)
                child.proc.kill()

    def stop_all(self, grace: float = STOP_GRACE_S) -> None:
        for rel in list(self.standbys):
            self.cancel_standby(rel)
        for child in self.children.values():
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while (self.children or self.retired) and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.1)
        self.reap_retired(wait=0)
        for child in self.children.values():
            log.error("%s: serve pid %d did not stop; SIGKILL", child.relpath, child.proc.pid)
            child.proc.kill()
            child.proc.wait()
        self.reap()

    # ---- the loop -------------------------------------------------------------------------

    def _wait(self, timeout: float) -> bool:
        """Wait for a xenstore event or a signal (a child's end); True for an event."""
        assert self._wake is not None
        ready, _, _ = select.select([self.xs.fileno(), self._wake[0]], [], [], timeout)
        if self._wake[0] in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake[0], 256):
                    pass
        return bool(ready) and self.xs.wait_event(0) is not None

    def request_stop(self, *_: object) -> None:
        self.stopping = True

    def run(self, poll_interval: float = 0.1) -> int:
        """Watch until SIGTERM/SIGINT (or ``request_stop``); returns the exit status."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        # a child's end wakes the loop at once (a dead serve's guest is waiting)
        self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake[1])
        signal.signal(signal.SIGCHLD, lambda *_: None)
        if self.serve_command is None:
            preload_serve()
        for root in self.roots.values():
            self.xs.watch(root, WATCH_TOKEN)
        log.info("watching %s for %s devices", " and ".join(self.roots.values()), SCRIPT_NAME)
        try:
            while not self.stopping:
                # every write under the root is an event: drain them, then scan once
                if self.xs.events() or self._wait(poll_interval):
                    self.xs.events()
                    self.scan()
                    self.check_restart_requests()
                self.reap()
                self.terminate_orphans()
                self.start_standbys()
        finally:
            self.stop_all()
            signal.set_wakeup_fd(-1)
            for fd in self._wake:
                os.close(fd)
            self._wake = None
            log.info("stopped")
        return 0


class AlreadyRunning(Exception):
    """Another watcher holds the lock: two would start two serves per device."""


def default_lock_path(xenstore_path: str) -> str:
    """One watcher per xenstored: the lock sits next to its socket (or in /run for the
    xenbus device)."""
    if xenstore_path.startswith("/dev/"):
        return "/run/blkpy-hotplug-daemon.lock"
    return os.path.join(os.path.dirname(xenstore_path), ".blkpy-hotplug-daemon.lock")


def take_lock(path: str) -> int:
    """Hold an exclusive lock on ``path`` for the life of the process; returns the fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(f"another blkpy hotplug daemon (pid {holder}) already watches "
                             f"this xenstore (lock {path})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def log_to_stderr(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s blkpy-hotplug[{os.getpid()}] %(levelname)s %(message)s")
