"""`blkpy hotplug daemon` against a simulated xenstored: which devices get a serve, and that
serves are reaped, stopped when their device vanishes, and stopped with the daemon; and how
the daemon treats standbys that keep failing."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import pytest

from blkpy.hotplug import watcher
from blkpy.hotplug.watcher import RESTART_BUDGET, RESTART_WINDOW_S, DeviceWatcher

from .conftest import BLKPY, add_disk

HERE = Path(__file__).resolve().parent


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


class Daemon:
    def __init__(self, xenstored: str, tmp_path: Path, fake: bool = True) -> None:
        self.out = tmp_path / "serves"
        self.out.mkdir()
        self.log = tmp_path / "daemon.log"
        cmd = [*BLKPY, "hotplug", "daemon", "--xenstore", xenstored, "--orphan-grace", "0.5",
               "--log-dir", str(tmp_path)]
        if fake:
            cmd += ["--serve-command", f"{sys.executable} {HERE / 'fake_serve.py'}"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stderr=log,
                                         env={**os.environ, "FAKE_SERVE_DIR": str(self.out)})
        wait_for(lambda: "watching" in self.log.read_text(), what="the daemon to start")

    def started(self) -> dict[int, list[str]]:
        return {int(p.name.split("-")[1]): p.read_text().split("\n")
                for p in self.out.glob("started-*")}

    def terminated(self, pid: int) -> bool:
        return (self.out / f"terminated-{pid}").exists()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def daemon(xenstored, tmp_path):
    d = Daemon(xenstored, tmp_path)
    yield d
    d.stop()


def test_serves_only_blkpy_devices(daemon, xs, raw_image, xenstored):
    add_disk(xs, raw_image, domid=3, devid=51712, script="/etc/xen/scripts/block")
    add_disk(xs, raw_image, domid=3, devid=51728, script="/etc/xen/scripts/block-blkpy")
    add_disk(xs, raw_image, domid=4, devid=51712, script="block-blkpy-debug")
    started = wait_for(lambda: len(daemon.started()) == 2 and daemon.started(),
                       what="two serves")
    argvs = sorted(a for a in started.values())
    assert [a[0] for a in argvs] == ["backend/vbd/3/51728", "backend/vbd/4/51712"]
    assert argvs[0][1:] == ["--platform", "linux", "--xenstore", xenstored]
    time.sleep(0.5)  # more xenstore traffic must not start anything twice
    xs.write("/local/domain/0/backend/vbd/3/51728/state", "2")
    time.sleep(0.5)
    assert len(daemon.started()) == 2


def test_reaps_a_serve_that_exits_and_does_not_restart_it(daemon, xs, raw_image):
    rel = add_disk(xs, raw_image)
    (pid,) = wait_for(lambda: daemon.started(), what="a serve")
    (daemon.out / f"exit-{pid}").write_text("")
    wait_for(lambda: f"serve pid {pid} ended (exit status 0)" in daemon.log.read_text(),
             what="the daemon to reap the serve")
    xs.write(f"/local/domain/0/{rel}/state", "6")
    time.sleep(0.5)
    assert list(daemon.started()) == [pid]


def test_terminates_a_serve_whose_device_vanished(daemon, xs, raw_image):
    rel = add_disk(xs, raw_image)
    (pid,) = wait_for(lambda: daemon.started(), what="a serve")
    xs.rm(f"/local/domain/0/{rel}")
    wait_for(lambda: daemon.terminated(pid), what="SIGTERM to the orphaned serve")
    # the same device created again gets a new serve
    add_disk(xs, raw_image)
    wait_for(lambda: len(daemon.started()) == 2, what="a serve for the re-created device")


def test_sigterm_stops_every_serve(daemon, xs, raw_image):
    add_disk(xs, raw_image, devid=51712)
    add_disk(xs, raw_image, devid=51728)
    pids = wait_for(lambda: len(daemon.started()) == 2 and daemon.started(), what="serves")
    assert daemon.stop() == 0
    assert all(daemon.terminated(pid) for pid in pids)
    assert "stopped" in daemon.log.read_text()


def test_forked_serve_runs_the_serve_command(xenstored, xs, tmp_path):
    """Without --serve-command the daemon forks `blkpy serve` itself; here (no Xen devices,
    image missing) that serve fails with serve's one-line error in the device's log."""
    d = Daemon(xenstored, tmp_path, fake=False)
    try:
        add_disk(xs, str(tmp_path / "missing.raw"), domid=7, devid=51712)
        log = tmp_path / "serve-7-51712.log"
        wait_for(lambda: "ended (exit status 1)" in d.log.read_text(), what="serve to fail")
        text = log.read_text()
        assert text.startswith("Error: ") and text.count("\n") == 1, text
    finally:
        assert d.stop() == 0


def test_a_second_daemon_on_the_same_xenstore_is_refused(daemon, xenstored):
    """Two watchers would start two serves for every device (seen in the lab)."""
    res = subprocess.run([*BLKPY, "hotplug", "daemon", "--xenstore", xenstored],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert f"another blkpy hotplug daemon (pid {daemon.proc.pid}) already watches" in res.stderr


def test_daemon_without_xenstored_fails_cleanly(tmp_path):
    res = subprocess.run([*BLKPY, "hotplug", "daemon", "--xenstore", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.startswith("Error: cannot connect to xenstored")


_CHILD = """
import sys, time
from blkpy.hotplug.watcher import set_cmdline
assert not set_cmdline(["x" * 1000000])  # more than any command line: refused, untouched
ok = set_cmdline(["blkpy", "serve", "backend/vbd/3/51712"])
open(sys.argv[1], "w").write("0" if ok else "1")
time.sleep(5)
"""


def test_a_forked_serve_is_recognised_by_its_command_line(tmp_path):
    """Forked serves rewrite their command line, so `remove` (and ps/pgrep) can tell them.
    The new command line must fit in the process's original one (the daemon's, here a
    child whose own command line leaves room, independent of how pytest was started)."""
    from blkpy.hotplug.device import is_serve_of

    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(ready), "x" * 64])
    try:
        wait_for(ready.exists, what="the child")
        wait_for(lambda: ready.read_text() != "", what="the child's verdict")
        assert ready.read_text() == "0"
        assert is_serve_of(child.pid, "backend/vbd/3/51712")
        assert is_serve_of(child.pid, "/local/domain/0/backend/vbd/3/51712")
        assert not is_serve_of(child.pid, "backend/vbd/3/51728")
    finally:
        child.kill()
        child.wait()


# ---- standbys that keep failing ------------------------------------------------------------


def _fake_forked_child(out: Path, standbys_fail: bool, argv: list[str], log_path: Path | None,
                       inherited: list[int], title: list[str] | None = None) -> NoReturn:
    """Stands in for what a forked child of the daemon runs (``_serve_in_child``): records
    its arguments as ``<out>/started-<pid>``. A serve then runs until killed; a standby
    exits at once (``standbys_fail``) or waits for its word, and once woken records
    ``<out>/took-over-<pid>`` and runs on as the device's serve."""
    code = 0
    try:
        for fd in inherited:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # not pytest's: a child left over must not hold its output open
            os.dup2(null, fd)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        (out / f"started-{os.getpid()}").write_text("\n".join(argv))
        if "--standby-fd" in argv:
            if standbys_fail:
                code = 1
                return  # (to finally)
            if os.read(int(argv[argv.index("--standby-fd") + 1]), 1) != b"g":
                return  # not needed any more
            (out / f"took-over-{os.getpid()}").write_text("")
        while True:
            signal.pause()
    except BaseException:
        code = 2
    finally:
        os._exit(code)  # never back into pytest


class ForkingDaemon:
    """The daemon's DeviceWatcher in this process, forking serves and standbys for real
    (their bodies faked) and driven pass by pass like its loop; its clock is ``now``, which
    only the test moves."""

    def __init__(self, xs, out: Path, standbys_fail: bool) -> None:
        self.out = out
        self.now = 0.0
        self.watcher = DeviceWatcher(xs, serve_args=["--platform", "sim"], standby_delay=0,
                                     clock=lambda: self.now)
        self.standbys_fail = standbys_fail

    def fake_child(self, *args, **kwargs) -> NoReturn:
        _fake_forked_child(self.out, self.standbys_fail, *args, **kwargs)

    def run_until(self, predicate, timeout: float = 30.0, what: str = "condition"):
        """Passes of the daemon's loop (0.01 s apart) until ``predicate()``."""
        def one_pass():
            w = self.watcher
            w.scan()
            w.reap()
            w.terminate_orphans()
            w.start_standbys()
            return predicate()
        return wait_for(one_pass, timeout, what)

    def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        self.run_until(lambda: time.monotonic() >= end)

    def started(self, standby: bool) -> dict[int, list[str]]:
        """The serves (or standbys) forked so far: pid -> arguments."""
        found = {int(p.name.split("-")[1]): p.read_text().split("\n")
                 for p in self.out.glob("started-*")}
        return {pid: argv for pid, argv in found.items() if ("--standby-fd" in argv) == standby}


@pytest.fixture
def forking_daemon(xs, tmp_path, monkeypatch):
    made: list[ForkingDaemon] = []

    def make(standbys_fail: bool = True) -> ForkingDaemon:
        out = tmp_path / "children"
        out.mkdir()
        d = ForkingDaemon(xs, out, standbys_fail)
        monkeypatch.setattr(watcher, "_serve_in_child", d.fake_child)
        made.append(d)
        return d

    yield make
    for d in made:
        d.watcher.request_stop()  # as its loop does on SIGTERM: no successor for what stops
        d.watcher.stop_all(grace=5.0)
        alive = [pid for pid in d.started(standby=False) | d.started(standby=True)
                 if Path(f"/proc/{pid}").exists()]
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        assert not alive, "children outlived the daemon"


def _failed(caplog) -> int:
    """How many standbys the daemon saw end unasked."""
    return sum(" standby pid " in r.getMessage() for r in caplog.records)


def _gave_up(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "standbys failed" in r.getMessage()]


def _exhaust_standbys(d: ForkingDaemon, caplog) -> None:
    """Run the daemon until its device's failing standbys used up their budget, then on for
    a while: no more are forked, and one line said so."""
    d.run_until(lambda: len(d.started(standby=True)) >= RESTART_BUDGET and _gave_up(caplog),
                what=f"{RESTART_BUDGET} standbys to fail")
    d.run_for(1.0)  # 100 passes more, with no standby
    assert len(d.started(standby=True)) == RESTART_BUDGET
    assert _gave_up(caplog) == [
        f"backend/vbd/5/51712: {RESTART_BUDGET} standbys failed within {RESTART_WINDOW_S:.0f} s; "
        f"none for {RESTART_WINDOW_S:.0f} s (the serve runs on; if it dies, a successor is "
        "forked then)"]


def test_a_standby_that_keeps_failing_is_forked_a_limited_number_of_times(
        forking_daemon, xs, caplog):
    caplog.set_level(logging.WARNING, logger="blkpy.hotplug.daemon")
    d = forking_daemon(standbys_fail=True)
    add_disk(xs, "disk.raw")
    _exhaust_standbys(d, caplog)
    assert len(d.started(standby=False)) == 1
    assert d.watcher.children["backend/vbd/5/51712"].proc.poll() is None, "the serve runs on"
    assert _failed(caplog) == RESTART_BUDGET  # one line per failure, no more


def test_standbys_are_forked_again_as_failures_leave_the_window(forking_daemon, xs, caplog):
    """The window slides: a failure that left it makes room for one more standby; and the
    daemon says it gives up once per window, not at every failure past the budget."""
    caplog.set_level(logging.WARNING, logger="blkpy.hotplug.daemon")
    d = forking_daemon(standbys_fail=True)
    add_disk(xs, "disk.raw")
    for i in range(RESTART_BUDGET):  # one failure a second
        d.run_until(lambda i=i: _failed(caplog) == i + 1, what=f"failure {i + 1}")
        d.now += 1.0
    d.run_for(0.5)
    assert len(d.started(standby=True)) == RESTART_BUDGET and len(_gave_up(caplog)) == 1
    d.now = RESTART_WINDOW_S - 0.5
    d.run_for(0.5)
    assert len(d.started(standby=True)) == RESTART_BUDGET  # not quite yet
    d.now = RESTART_WINDOW_S  # the first failure has left the window: room for one
    d.run_until(lambda: _failed(caplog) == RESTART_BUDGET + 1, what="one more standby")
    d.run_for(0.5)
    assert len(d.started(standby=True)) == RESTART_BUDGET + 1
    assert len(_gave_up(caplog)) == 1  # spent again at once, but said a minute ago
    d.now = RESTART_WINDOW_S + RESTART_BUDGET - 1  # all the first failures have left
    d.run_until(lambda: len(_gave_up(caplog)) == 2, what="giving up again")
    d.run_for(0.5)
    assert len(d.started(standby=True)) == 2 * RESTART_BUDGET
    assert _gave_up(caplog)[1].startswith(
        f"backend/vbd/5/51712: {RESTART_BUDGET} standbys failed within "
        f"{RESTART_WINDOW_S:.0f} s; none for {RESTART_WINDOW_S - RESTART_BUDGET + 1:.0f} s ")


def test_a_serve_killed_without_standby_still_gets_a_successor(forking_daemon, xs, caplog):
    caplog.set_level(logging.INFO, logger="blkpy.hotplug.daemon")
    d = forking_daemon(standbys_fail=True)
    rel = add_disk(xs, "disk.raw")
    _exhaust_standbys(d, caplog)
    xs.write(f"/local/domain/0/{rel}/state", "4")  # connected: a successor must take over
    (serve,) = d.started(standby=False)
    os.kill(serve, signal.SIGKILL)
    successors = d.run_until(lambda: {p: a for p, a in d.started(standby=False).items()
                                      if p != serve}, what="a successor")
    ((pid, argv),) = successors.items()
    assert argv[0] == "serve" and argv[1] == rel and "--resume" in argv
    assert f"{rel}: starting a successor to take the device over" in caplog.text
    d.run_for(0.5)
    assert d.watcher.children[rel].proc.pid == pid and d.watcher.children[rel].proc.poll() is None
    assert len(d.started(standby=True)) == RESTART_BUDGET  # and still no standby


def test_woken_standbys_are_no_failures(forking_daemon, xs, caplog):
    """A device whose serve was killed as often as the daemon allows, each time succeeded by
    its standby, still gets a standby."""
    d = forking_daemon(standbys_fail=False)
    rel = add_disk(xs, "disk.raw")
    xs.write(f"/local/domain/0/{rel}/state", "4")
    for _ in range(RESTART_BUDGET):
        (standby,) = d.run_until(lambda: [p for p in d.started(standby=True)
                                          if not (d.out / f"took-over-{p}").exists()],
                                 what="a standby")
        os.kill(d.watcher.children[rel].proc.pid, signal.SIGKILL)
        d.run_until(lambda s=standby: (d.out / f"took-over-{s}").exists(), what="the takeover")
    d.run_until(lambda: len(d.started(standby=True)) == RESTART_BUDGET + 1,
                what="a standby for the last successor")
    assert not _gave_up(caplog)


def test_a_killed_serve_s_standby_gets_its_word_before_the_end_is_logged(
        forking_daemon, xs, caplog, monkeypatch):
    """The guest waits from the kill to the standby's takeover: the daemon writes the
    standby's byte first and logs the serve's end after (once)."""
    caplog.set_level(logging.INFO, logger="blkpy.hotplug.daemon")
    d = forking_daemon(standbys_fail=False)
    rel = add_disk(xs, "disk.raw")
    xs.write(f"/local/domain/0/{rel}/state", "4")
    (standby,) = d.run_until(lambda: list(d.started(standby=True)), what="a standby")
    events: list[str] = []
    wake = d.watcher._wake_standby

    def woken(rel: str):
        events.append("word")
        return wake(rel)

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "ended (signal 9)" in record.getMessage():
                events.append("ended")

    monkeypatch.setattr(d.watcher, "_wake_standby", woken)
    seen = Seen()
    logging.getLogger("blkpy.hotplug.daemon").addHandler(seen)
    try:
        os.kill(d.watcher.children[rel].proc.pid, signal.SIGKILL)
        d.run_until(lambda: (d.out / f"took-over-{standby}").exists(), what="the takeover")
    finally:
        logging.getLogger("blkpy.hotplug.daemon").removeHandler(seen)
    assert events == ["word", "ended"]
    assert f"{rel}: standby pid {standby} takes the device over" in caplog.text
