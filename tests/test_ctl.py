"""`blkpy ctl pause|resume` on a running serve: a live external snapshot under a guest
(pause, qemu-img create an overlay, resume on it), as tap-ctl pause/unpause does."""

import subprocess
import threading
import time
from pathlib import Path

from click.testing import CliRunner

from blkpy.cli import main
from blkpy.sim import toolstack
from blkpy.sim.frontend import Frontend
from blkpy.sim.host import SimHost
from tests.qemu_img import check_clean, needs_qemu, qemu_img

pytestmark = needs_qemu
MIB = 1 << 20


def test_live_external_snapshot_under_a_running_guest(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x11" * (4 * MIB))
    overlay = tmp_path / "top.qcow2"
    with SimHost() as host:
        guest = host.create_guest(1, memory_pages=2048)
        spec = toolstack.DiskSpec(1, 51712, "xvda", f"raw:{base}")
        host.add_disk(spec)
        fe = Frontend(guest, host.guest_xenstore(1), 51712)
        fe.connect(timeout=15)
        assert fe.write(0, b"\x22" * 4096).status == 0
        run = str(Path(host.sim_dir) / "run")
        ctl = CliRunner()

        out = ctl.invoke(main, ["ctl", "pause", "1", "51712", "--run-dir", run])
        assert out.exit_code == 0, out.output
        assert "paused" in out.output
        # While paused the guest's request waits in the ring; nothing reaches the image.
        done = {}
        writer = threading.Thread(target=lambda: done.setdefault(
            "w", fe.write(8, b"\x33" * 4096, timeout=30)))
        writer.start()
        time.sleep(0.5)
        assert "w" not in done
        assert base.read_bytes()[4096:8192] == b"\x11" * 4096
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
        small = tmp_path / "small.raw"
        small.write_bytes(bytes(MIB))
        bad = ctl.invoke(main, ["ctl", "resume", "1", "51712", "--image", str(small),
                                "--format", "raw", "--run-dir", run])
        assert bad.exit_code == 1 and "the guest has" in bad.output  # size change refused
        out = ctl.invoke(main, ["ctl", "resume", "1", "51712", "--image", str(overlay),
                                "--format", "qcow2", "--run-dir", run])
        assert out.exit_code == 0, out.output
        writer.join(30)
        assert done["w"].status == 0
        assert fe.write(16, b"\x44" * 4096).status == 0
        got = fe.read(0, 12288)
        assert got.status == 0
        assert got.data.tobytes() == b"\x22" * 4096 + b"\x33" * 4096 + b"\x44" * 4096
        assert host.xs.read_str("/local/domain/0/backend/vbd/1/51712/params") == \
            f"qcow2:{overlay}"
        fe.close()
        host.remove_disk(spec)
    # The base froze at the pause; everything after lives in the overlay.
    assert base.read_bytes()[:8192] == b"\x22" * 4096 + b"\x11" * 4096
    check_clean(str(overlay))
    assert subprocess.run(["qemu-img", "compare", "-q", str(overlay), str(base)]).returncode == 1


def test_ctl_on_a_device_nobody_serves_is_one_line(tmp_path):
    out = CliRunner().invoke(main, ["ctl", "pause", "3", "4", "--run-dir", str(tmp_path)])
    assert out.exit_code == 1
    assert out.output.strip() == "Error: no running blkpy serve for domain 3 device 4"
