"""`blkpy hotplug add|remove|install` and the block-blkpy script, against a simulated xenstored."""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import blkpy
from blkpy.hotplug.device import DiskParams, HotplugError, hotplug_remove, parse_params
from blkpy.hotplug.script import install_script

from .conftest import BLKPY, add_disk, run_blkpy

BE = "/local/domain/0/"


@pytest.mark.parametrize(("params", "expected"), [
    ("/img/a.raw", DiskParams("raw", "/img/a.raw")),
    ("raw:/img/a.raw", DiskParams("raw", "/img/a.raw")),
    ("qcow2:/img/a.qcow2", DiskParams("qcow2", "/img/a.qcow2")),
    ("/img/odd:name.raw", DiskParams("raw", "/img/odd:name.raw")),
])
def test_params_state_the_format(params, expected):
    assert parse_params(params) == expected


@pytest.mark.parametrize(("params", "message"), [
    ("vhd:/img/a.vhd", "unsupported image format 'vhd'"),
    ("", "params is empty"),
    ("raw:", "params is empty"),
    ("img/a.raw", "not absolute"),
])
def test_bad_params_are_refused(params, message):
    with pytest.raises(HotplugError, match=message):
        parse_params(params)


def test_add_reports_connected(xenstored, xs, raw_image):
    rel = add_disk(xs, f"raw:{raw_image}")
    res = run_blkpy(["hotplug", "add"], xenstored, XENBUS_PATH=rel)
    assert res.returncode == 0, res.stderr
    assert xs.read_str(BE + rel + "/hotplug-status") == "connected"
    assert xs.read_str(BE + rel + "/physical-device-path") == raw_image
    assert xs.read_str(BE + rel + "/hotplug-error") is None


@pytest.mark.parametrize(("target", "message"), [
    ("/nonexistent/disk.raw", "No such file or directory"),
    ("vhd:/nonexistent/disk.vhd", "unsupported image format"),
    ("/dev/null", "neither a regular file nor a block device"),
])
def test_add_failure_is_one_line_and_recorded(xenstored, xs, target, message):
    rel = add_disk(xs, target)
    res = run_blkpy(["hotplug", "add", rel], xenstored)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert xs.read_str(BE + rel + "/hotplug-status") == "error"
    assert message in xs.read_str(BE + rel + "/hotplug-error")


def test_add_without_xenstored_fails_cleanly(tmp_path):
    res = run_blkpy(["hotplug", "add", "backend/vbd/1/51712"], str(tmp_path / "nothing"))
    assert res.returncode == 1 and res.stderr.startswith("Error: cannot connect to xenstored")


def _fake_serve(rel: str) -> subprocess.Popen[bytes]:
    """A process whose command line looks like `blkpy serve <rel>` and that ignores nothing."""
    code = "import time\nwhile True: time.sleep(0.05)"
    return subprocess.Popen([sys.executable, "-c", code, "serve", rel])


def test_remove_stops_the_serve_of_the_device(xenstored, xs, raw_image):
    rel = add_disk(xs, raw_image)
    proc = _fake_serve(rel)
    try:
        xs.write(BE + rel + "/kthread-pid", str(proc.pid))
        res = run_blkpy(["hotplug", "remove"], xenstored, XENBUS_PATH=rel)
        assert res.returncode == 0, res.stderr
        assert proc.wait(timeout=30) == -15  # SIGTERM after the grace period
        assert f"serve pid {proc.pid} is gone" in res.stderr
    finally:
        proc.kill()


def test_remove_never_signals_a_process_that_is_not_this_devices_serve(xs, raw_image):
    rel = add_disk(xs, raw_image)
    other = _fake_serve("backend/vbd/9/51712")  # another device's serve (or a reused pid)
    try:
        xs.write(BE + rel + "/kthread-pid", str(other.pid))
        assert hotplug_remove(xs, rel, grace=0.1) == "no serve process left"
        time.sleep(0.2)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_install_writes_an_executable_script_and_the_unit(tmp_path):
    units = tmp_path / "systemd"
    units.mkdir()
    res = subprocess.run([*BLKPY, "hotplug", "install", "--dir", str(tmp_path),
                          "--python", "/opt/x/python3", "--systemd-dir", str(units)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    script = tmp_path / "block-blkpy"
    unit = units / "blkpy-hotplug.service"
    assert res.stdout.split() == [str(script), str(unit)]
    text = unit.read_text()
    assert "ExecStart=/opt/x/python3 -m blkpy hotplug daemon" in text
    assert "KillMode=process" in text  # restarting the watcher must not kill the disks
    assert "Before=xendomains.service" in text.replace(" xen-watchdog.service", "")
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    text = script.read_text()
    assert 'PYTHON="/opt/x/python3"' in text
    assert f'BLKPY_HOME="{Path(blkpy.__file__).resolve().parent.parent}"' in text


def test_install_into_a_missing_dir_is_one_line(tmp_path):
    res = subprocess.run([*BLKPY, "hotplug", "install", "--dir", str(tmp_path / "no"),
                          "--no-systemd"], capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "not a directory" in res.stderr


def test_shell_script_runs_add_as_libxl_would(tmp_path, xenstored, xs, raw_image):
    script = install_script(tmp_path)
    rel = add_disk(xs, raw_image)
    # libxl's environment: no PYTHONPATH, a minimal PATH
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "XENSTORED_PATH": xenstored,
           "XENBUS_PATH": rel, "XENBUS_TYPE": "vbd"}
    res = subprocess.run([str(script), "add"], env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert xs.read_str(BE + rel + "/hotplug-status") == "connected"
    del env["XENBUS_PATH"]
    res = subprocess.run([str(script), "add"], env=env, capture_output=True, text=True)
    assert res.returncode == 1 and "XENBUS_PATH is not set" in res.stderr
