"""The lab's command line and QEMU command, without booting anything (runs in the normal
suite, unlike test_lab.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .boot import CPU_MODEL, qemu_command
from .images import SUITES, Images, kconfig_value
from .lab import known_phases, main, suite_phases
from .results import format_summary, parse_checks, parse_figures, xentop_rows

DOM0 = Path(__file__).parent / "dom0"


def _cmd(**kw: str) -> list[str]:
    return qemu_command(Images(Path("/images"), "6.1"), Path("/run"), Path("/src"), **kw)


def _after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_default_machine_is_mttcg_with_the_masked_cpu():
    cmd = _cmd()
    assert _after(cmd, "-accel") == "tcg"
    assert _after(cmd, "-cpu") == CPU_MODEL


def test_accel_and_cpu_can_be_chosen():
    cmd = _cmd(accel="tcg-single", cpu="max,-avx")
    assert _after(cmd, "-accel") == "tcg,thread=single"
    assert _after(cmd, "-cpu") == "max,-avx"


def test_xen_args_reach_xen_s_command_line():
    cmd = qemu_command(Images(Path("/images"), "6.1"), Path("/run"), Path("/src"),
                       xen_args="pv-l1tf=false")
    assert _after(cmd, "-append").endswith(" smep=0 pv-l1tf=false")


def test_one_cpu_machine_gives_dom0_one_vcpu():
    cmd = qemu_command(Images(Path("/images"), "6.1"), Path("/run"), Path("/src"), smp=1)
    assert _after(cmd, "-smp") == "1"
    assert "dom0_max_vcpus=1 " in _after(cmd, "-append")


@pytest.mark.parametrize("argv", [["run", "--debug", "cores,bogus"], ["run", "--phases", "nope"]])
def test_unknown_debug_knob_or_phase_is_refused_before_booting(argv, capsys):
    assert main(argv) == 2
    assert "unknown" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["run", "--lifecycle-kinds", "kill,reboot"],
                                  ["run", "--lifecycle-kinds", ","],
                                  ["run", "--lifecycle-rounds", "0"]])
def test_bad_lifecycle_choice_is_refused_before_booting(argv, capsys):
    assert main(argv) == 2
    assert "--lifecycle" in capsys.readouterr().err


def test_lifecycle_choices_reach_the_phase(tmp_path, monkeypatch):
    """The options become the variables phase-lifecycle.sh reads (prepare_run writes them
    into the run's lab.env, which dom0 sources)."""
    from . import lab
    seen = {}

    def fake_run_lab(phases, timeout, **kw):
        seen.update(kw["phase_env"])
        raise lab.BuildError("stop here")

    monkeypatch.setattr(lab, "run_lab", fake_run_lab)
    assert main(["run", "--phases", "lifecycle", "--lifecycle-kinds", "kill,upgrade",
                 "--lifecycle-rounds", "3"]) == 2
    assert seen == {"LAB_LIFECYCLE_KINDS": "kill upgrade", "LAB_LIFECYCLE_ROUNDS": "3"}
    script = (DOM0 / "phase-lifecycle.sh").read_text()
    assert "LAB_LIFECYCLE_KINDS" in script and "LAB_LIFECYCLE_ROUNDS" in script
    assert "lcblocks=${LAB_LIFECYCLE_BLOCKS" in script
    assert "lcblocks=" in (DOM0.parent / "domU" / "job-lifecycle").read_text()


def test_ci_adds_a_short_lifecycle_to_a_session():
    """CI's variables (.ci/run) become the session's phases and the phase's variables."""
    from .lab import session_phases

    env = {"BLKPY_XENLAB_EXTRA_PHASES": "lifecycle", "BLKPY_XENLAB_LIFECYCLE_ROUNDS": "2",
           "BLKPY_XENLAB_LIFECYCLE_BLOCKS": "4"}
    phases, phase_env = session_phases("bookworm", env)
    assert phases == [*suite_phases("bookworm"), "lifecycle"]
    assert phase_env == {"LAB_LIFECYCLE_ROUNDS": "2", "LAB_LIFECYCLE_BLOCKS": "4"}
    assert session_phases("trixie", {}) == (["vbd3"], {})
    for bad in ({"BLKPY_XENLAB_EXTRA_PHASES": "reboot"},
                {"BLKPY_XENLAB_LIFECYCLE_ROUNDS": "0"},
                {"BLKPY_XENLAB_LIFECYCLE_KINDS": "kill,nap"}):
        with pytest.raises(ValueError):
            session_phases("bookworm", bad)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler")
def test_freshcheck_builds(tmp_path):
    """dom0 compiles freshcheck.c itself (--debug freshcheck, the stress phase)."""
    out = tmp_path / "freshcheck"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-pthread", "-o", str(out),
                    str(DOM0 / "freshcheck.c")], check=True)
    usage = subprocess.run([str(out)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_summary_shows_xentop_beside_the_guest():
    text = ("LAB-CHECK: vbd3.xentop-xvda PASS Tapdisk3\n"
            "LAB-FIGURE: vbd3.xentop.xvda.rd_req 120 req guest 120\n"
            "LAB-FIGURE: vbd3.xentop.xvda.wr_sect 5200 sect guest 5208\n")
    figures = parse_figures(text)
    assert xentop_rows(figures) == {"xvda": {"rd_req": (120, 120), "wr_sect": (5200, 5208)}}
    summary = format_summary(parse_checks(text), figures)
    assert "xvda  rd_req 120:120" in summary and "wr_sect 5200:5208 (guest +8)" in summary


def test_kconfig_value_reads_kconfig():
    config = ("CONFIG_PV=y\n# CONFIG_PV32 is not set\n# CONFIG_SHADOW_PAGING is not set\n"
              'CONFIG_NR_CPUS=256\nCONFIG_CC_VERSION_TEXT="gcc (Debian 12.2.0-14) 12.2.0"\n')
    assert kconfig_value(config, "CONFIG_PV") == "y"
    assert kconfig_value(config, "CONFIG_SHADOW_PAGING") == "n"
    assert kconfig_value(config, "CONFIG_HVM") == "n"
    assert kconfig_value(config, "CONFIG_NR_CPUS") == "256"


def test_a_kind_the_host_cannot_run_says_so_in_the_stall_table():
    text = ("LAB-CHECK: lifecycle.migrate.xl-migrate SKIP not runnable on this Xen build: ...\n"
            "LAB-CHECK: lifecycle.migrate.io-errors PASS 0 failed requests\n"
            "LAB-FIGURE: lifecycle.migrate.stall-ms 610 ms longest request of 148\n"
            "LAB-FIGURE: lifecycle.kill.stall-ms 700 ms longest request of 816\n")
    summary = format_summary(parse_checks(text), parse_figures(text))
    assert "checks: 1 passed, 0 failed, 1 skipped" in summary
    row = next(line for line in summary.splitlines() if line.startswith("  migrate   stall"))
    assert "io-errors PASS" in row and "xl-migrate SKIP (not runnable here" in row
    assert "target <= 1000 ms met" in summary


def test_the_stall_table_takes_the_guest_s_tenths_of_a_ms_and_its_gaps():
    """The guest reports µs-timed requests as ms with one decimal: 180.4 meets 200, 200.1
    does not; the longest gap without a completion stands beside the stall."""
    text = ("LAB-FIGURE: lifecycle.upgrade.stall-ms 180.4 ms longest request of 900\n"
            "LAB-FIGURE: lifecycle.upgrade.gap-ms 212.7 ms longest time without a completion\n"
            "LAB-FIGURE: lifecycle.upgrade.window-ms 96 ms longest of 20 hand-over windows\n"
            "LAB-FIGURE: lifecycle.kill.stall-ms 1000.1 ms longest request of 816\n")
    summary = format_summary(parse_checks(text), parse_figures(text))
    upgrade = next(line for line in summary.splitlines() if line.startswith("  upgrade   stall"))
    kill = next(line for line in summary.splitlines() if line.startswith("  kill      stall"))
    assert "180.4 ms" in upgrade and "target <= 200 ms met" in upgrade and "gap    212.7 ms" in upgrade
    assert "window   96.0 ms" in upgrade
    assert "1000.1 ms" in kill and "target <= 1000 ms short" in kill and "gap" not in kill
    assert "window" not in kill


def test_the_stall_table_lists_warmup_first_and_then_the_phase_s_order():
    """A migrated guest's console is relayed first, so its kinds come first in the log."""
    text = "".join(f"LAB-FIGURE: lifecycle.{k}.stall-ms 1 ms x\n"
                   for k in ("migrate", "kill", "warmup", "upgrade", "save"))
    lines = format_summary(parse_checks(text), parse_figures(text)).splitlines()
    table = lines[lines.index("guest stall per kind (lifecycle):") + 1:]
    assert [row.split()[0] for row in table] == ["warmup", "upgrade", "save", "migrate", "kill"]


def test_suites_and_their_phases(capsys):
    assert SUITES["trixie"].xen == "4.20" and SUITES["bookworm"].xen == "4.17"
    assert suite_phases("trixie") == ["vbd3"] and "vbd3" not in known_phases("bookworm")
    assert main(["run", "--suite", "bookworm", "--phases", "vbd3"]) == 2
    assert "unknown phase(s) vbd3 on bookworm" in capsys.readouterr().err


def test_the_nbd_phase_runs_on_both_hosts_by_default_on_one():
    """Either host can be asked for it; one boot of CI runs it."""
    assert all("nbd" in known_phases(s) for s in SUITES)
    assert [s for s in SUITES if "nbd" in suite_phases(s)] == ["bookworm"]


def test_every_phase_has_its_dom0_script():
    for suite in SUITES:
        for phase in known_phases(suite):
            assert (DOM0 / f"phase-{phase}.sh").is_file(), phase
