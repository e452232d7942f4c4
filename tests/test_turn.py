"""blkpy.turn: one hand-over at a time on a host."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from blkpy.turn import HostTurn


def test_a_free_turn_is_taken_at_once_and_a_held_one_waited_for(tmp_path):
    path = tmp_path / "handover.lock"
    first, second = HostTurn(path), HostTurn(path)
    waited = first.take()
    assert waited is not None and waited < 0.5 and first.held
    threading.Timer(0.3, first.release).start()
    waited = second.take(timeout=10)
    assert waited is not None and waited >= 0.25 and second.held and not first.held
    second.release()
    second.release()  # idempotent
    assert HostTurn(path).take(timeout=0) is not None


def test_a_turn_held_too_long_is_not_waited_for_any_more(tmp_path):
    path = tmp_path / "handover.lock"
    holder = HostTurn(path)
    assert holder.take() is not None
    t0 = time.monotonic()
    assert HostTurn(path).take(timeout=0.2) is None
    assert 0.2 <= time.monotonic() - t0 < 5
    holder.release()


def test_a_holder_that_dies_lets_the_turn_go(tmp_path):
    path = tmp_path / "handover.lock"
    code = ("import sys, time; from pathlib import Path; from blkpy.turn import HostTurn; "
            f"t = HostTurn(Path({str(path)!r})); assert t.take() is not None; "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        assert HostTurn(path).take(timeout=0.1) is None
        proc.kill()
        proc.wait()
        waited = HostTurn(path).take(timeout=5)
        assert waited is not None and waited < 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_without_a_run_directory_there_is_no_turn(tmp_path):
    assert HostTurn(tmp_path / "missing" / "handover.lock").take() is None
