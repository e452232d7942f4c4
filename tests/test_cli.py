"""The command line as an operator uses it: `blkpy sim run`, exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest


def blkpy(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "blkpy", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_sim_run_default_image_passes():
    proc = blkpy("sim", "run", "--requests", "300")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "result    OK" in proc.stdout and "mismatches 0" in proc.stdout


@pytest.mark.parametrize("abi,order", [("x86_32-abi", 2), ("arm-abi", 1)])
def test_sim_run_randrw_json(raw_image, abi, order):
    proc = blkpy("sim", "run", raw_image, "--workload", "randrw", "--requests", "400",
                 "--abi", abi, "--ring-order", str(order), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] and result["workload"]["mismatches"] == 0
    assert result["config"]["fmt"] == "raw" and result["disk"]["sectors"] == 8192


def test_sim_run_read_only_disk(raw_image):
    proc = blkpy("sim", "run", raw_image, "--readonly", "--requests", "200", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["workload"]["expected_errors"] > 0
    assert result["disk"]["info"] & 4


def test_sim_run_reports_a_failing_backend(raw_image):
    # serve refuses to open a raw file as qcow2: the run must fail, loudly but cleanly
    proc = blkpy("sim", "run", raw_image, "--requests", "10",
                 "--serve-arg=--format", "--serve-arg=qcow2")
    assert proc.returncode == 1
    assert "FAILED" in proc.stderr and "Traceback" not in proc.stdout


@pytest.mark.parametrize("args,needle", [
    (["sim", "run", "/nonexistent/disk.img"], "nonexistent"),
    (["sim", "run", "--ring-order", "9"], "ring-order"),
    (["serve"], "BACKEND_PATH"),
    (["serve", "backend/vbd/1/51712", "--platform", "sim"], "sim dir"),
])
def test_bad_input_is_one_clear_line(args, needle, monkeypatch):
    monkeypatch.delenv("BLKPY_SIM_DIR", raising=False)
    proc = blkpy(*args)
    assert proc.returncode != 0
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_sim_run_serves_a_qcow2_overlay_that_qemu_img_trusts(tmp_path):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                    str(base), "32M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 8M", str(base)], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F",
                    "qcow2", str(top)], check=True)
    proc = blkpy("sim", "run", str(top), "--workload", "randrw", "--requests", "600",
                 "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["config"]["fmt"] == "qcow2" and result["workload"]["mismatches"] == 0
    check = subprocess.run(["qemu-img", "check", str(top)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    # the backing file was never written
    assert subprocess.run(["qemu-img", "check", str(base)]).returncode == 0
