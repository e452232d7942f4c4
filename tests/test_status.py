"""Device status for operators (blkpy.status) and the `blkpy list` / `blkpy stats`
commands, on a real `blkpy serve` of the simulated host."""

import json
import os
import struct
import time
from pathlib import Path

from click.testing import CliRunner

from blkpy import status
from blkpy.cli import main
from blkpy.sim import toolstack
from blkpy.sim.frontend import Frontend
from blkpy.sim.host import SimHost


def _device(pid: int) -> status.DeviceStatus:
    return status.DeviceStatus(domid=3, devid=51712, backend_path="/x", pid=pid,
                               image="/img", format="raw", started=100.0)


def test_publisher_rates_files_and_vbd3_page(tmp_path):
    pub = status.StatusPublisher(_device(os.getpid()), tmp_path / "run", tmp_path / "shm")
    pub.update({"rd_req": 10, "rd_sect": 80}, now=101.0, state="Connected", queues=2)
    pub.update({"rd_req": 110, "rd_sect": 880, "wr_req": 50, "wr_sect": 400}, now=103.0)
    got = status.find(3, 51712, tmp_path / "run")
    assert got is not None and got.state == "Connected" and got.queues == 2
    assert got.iops == 75.0  # (100 reads + 50 writes) / 2 s
    assert got.read_mb_s == 800 * 512 / 2 / 1e6
    assert got.uptime == 3.0
    page = (tmp_path / "shm" / f"td3-{os.getpid()}" / "vbd-3-51712").read_bytes()
    assert len(page) == 96  # struct vbd3_stats, version 1 (tapdisk-metrics-stats.h)
    fields = struct.unpack("<II11Q", page)
    assert fields[0] == 1
    assert fields[3] == 110 and fields[5] == 880  # read_reqs_submitted, read_sectors
    assert fields[7] == 50 and fields[9] == 400  # write_reqs_submitted, write_sectors
    pub.close()
    assert status.read_all(tmp_path / "run") == []


def test_files_of_dead_serves_are_not_listed(tmp_path):
    dead = _device(2**22 + 12345)  # beyond pid_max on these machines: never alive
    status.StatusPublisher(dead, tmp_path, tmp_path).update({}, now=1.0)
    (tmp_path / "vbd-9-9.json").write_text("{not json")
    assert status.read_all(tmp_path) == []


def test_list_and_stats_of_a_running_serve(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    with SimHost() as host:
        guest = host.create_guest(1, memory_pages=2048)
        spec = toolstack.DiskSpec(1, 51712, "xvda", str(image))
        backend = host.add_disk(spec)
        fe = Frontend(guest, host.guest_xenstore(1), 51712)
        fe.connect(timeout=15)
        for k in range(7):
            assert fe.read(k * 8, 4096).status == 0
        assert fe.write(64, bytes(8192)).status == 0
        run = Path(host.sim_dir) / "run"
        deadline = time.monotonic() + 10
        runner = CliRunner()
        while True:
            out = runner.invoke(main, ["stats", "1", "51712", "--run-dir", str(run), "--json"])
            counters = json.loads(out.output) if out.exit_code == 0 else {}
            if counters.get("rd_req") == 7 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert counters["rd_req"] == 7 and counters["wr_req"] == 1
        assert counters["rd_sect"] == 56 and counters["wr_sect"] == 16
        listed = json.loads(runner.invoke(main, ["list", "--run-dir", str(run), "--json"]).output)
        assert [(d["domid"], d["devid"], d["state"], d["format"]) for d in listed] == [
            (1, 51712, "Connected", "raw")]
        assert listed[0]["pid"] == backend.proc.pid and listed[0]["queues"] == 1
        table = runner.invoke(main, ["list", "--run-dir", str(run)]).output.splitlines()
        assert table[0].split()[:3] == ["DOMID", "DEVID", "STATE"]
        assert table[1].split()[:3] == ["1", "51712", "Connected"]
        page = Path(host.sim_dir) / "shm" / f"td3-{backend.proc.pid}" / "vbd-1-51712"
        assert struct.unpack("<II11Q", page.read_bytes())[3] == 7
        fe.close()
        host.remove_disk(spec)
        assert backend.wait(10) == 0
        assert not list(run.glob("*.json"))  # a serve that exits takes its files along
        lines = [line for line in backend.log().splitlines() if " blkpy[" in line]
        assert lines and all(" vbd-1-51712 " in line for line in lines)  # one journal, many disks


def test_stats_of_an_unknown_device_is_one_line(tmp_path):
    out = CliRunner().invoke(main, ["stats", "4", "5", "--run-dir", str(tmp_path)])
    assert out.exit_code == 1
    assert out.output.strip() == "blkpy stats: no running blkpy serve for domain 4 device 5"
