"""Per-disk I/O limits (blkpy.qos): the settings' rules, the C buckets, and a serve of
the simulated host held to its limits, changed while the guest runs."""

import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from blkpy.cli import main
from blkpy.qos import NODES, Limit, QosError, QosLimits, QosState, parse_limits
from blkpy.sim import toolstack
from blkpy.sim.frontend import Frontend
from blkpy.sim.host import SimHost
from blkpy.status import find


def test_settings_follow_qemus_rules():
    assert parse_limits({}).active is False
    got = parse_limits({"iops-total": "500", "bps-write": "1048576", "bps-write-max": "2097152",
                        "bps-write-max-length": "3"})
    assert got.limits == {"iops-total": Limit(500), "bps-write": Limit(1048576, 2097152, 3)}
    assert parse_limits(got.to_nodes()) == got
    for bad in ({"iops-total": "5", "iops-read": "5"}, {"iops-read-max": "5"},
                {"bps-read": "10", "bps-read-max": "5"}, {"iops-write": "-1"},
                {"iops-write": "1e3"}, {"bps-total": "5", "bps-total-max-length": "2"},
                {"colour": "blue"}, {"iops-total": str(2**60)}):
        with pytest.raises(QosError):
            parse_limits(bad)


@given(st.dictionaries(st.sampled_from([*NODES, "x"]), st.text(max_size=12), max_size=6))
def test_any_settings_are_limits_or_one_error(nodes):
    try:
        limits = parse_limits(nodes)
    except QosError as exc:
        assert str(exc).startswith("qos")
    else:
        assert isinstance(limits, QosLimits)


def test_bucket_holds_a_tenth_of_a_second_then_waits():
    q = QosState(parse_limits({"iops-read": "1000"}))
    start = time.monotonic()
    admitted = 0
    while (wait := q.admit(False, 4096)) == 0:
        admitted += 1
    leaked = (time.monotonic() - start) * 1000 + 1
    assert 100 <= admitted <= 101 + leaked  # QEMU: avg/10 without a burst
    assert 0 < wait <= 2_000_000  # about one request's worth: 1 ms
    assert q.admit(True, 4096) == 0  # writes are not limited
    q.configure(QosLimits())
    assert not q.active


def _read_seconds(fe, n: int) -> float:
    t = time.monotonic()
    for k in range(n):
        assert fe.read(k * 8, 4096).status == 0
    return time.monotonic() - t


@pytest.mark.parametrize("serve_args", [[], ["--grant-mode", "copy"]])
def test_a_serve_keeps_to_limits_set_at_attach_and_changed_at_run_time(tmp_path, serve_args):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    with SimHost(serve_args) as host:
        guest = host.create_guest(1, memory_pages=2048)
        spec = toolstack.DiskSpec(1, 51712, "xvda", str(image))
        host.add_disk(spec, start_backend=False)
        base = "/local/domain/0/backend/vbd/1/51712/qos"
        host.xs.write(f"{base}/iops-total", "200")  # at attach, before the serve starts
        backend = host.start_backend(spec)
        fe = Frontend(guest, host.guest_xenstore(1), 51712)
        fe.connect(timeout=15)
        # 100 reads at 200/s: a bucket of 20 (plus the request that fills it) goes at
        # once, the rest at the rate; never faster than that, however slow the machine.
        assert _read_seconds(fe, 100) >= (100 - 22) / 200
        run = Path(host.sim_dir) / "run"
        env = {"XENSTORED_PATH": host.socket}
        out = CliRunner().invoke(main, ["qos", "1", "51712", "--clear", "--show"], env=env)
        assert out.exit_code == 0, out.output
        deadline = time.monotonic() + 10
        while backend.stats().get("qos", {}).get("limits") and time.monotonic() < deadline:
            time.sleep(0.05)
        delays = backend.stats()["qos"]["delays"]
        assert delays > 0
        _read_seconds(fe, 100)
        assert backend.stats()["qos"]["delays"] == delays  # no limit: nothing waited
        out = CliRunner().invoke(main, ["qos", "1", "51712", "--set", "iops-read=100"], env=env)
        assert out.exit_code == 0, out.output
        deadline = time.monotonic() + 10
        while not backend.stats()["qos"]["limits"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.stats()["qos"]["limits"] == {"iops-read": "100"}
        assert _read_seconds(fe, 30) >= (30 - 12) / 100
        bad = CliRunner().invoke(main, ["qos", "1", "51712", "--set", "iops-total=5"], env=env)
        assert bad.exit_code == 1 and "cannot be combined" in bad.output
        assert find(1, 51712, run) is not None
        fe.close()
        host.remove_disk(spec)
        backend.wait(10)
