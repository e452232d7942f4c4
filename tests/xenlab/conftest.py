"""One lab boot per pytest session (marker ``xenlab``): every test reads its own check from
the same serial log. BLKPY_XENLAB_RUN=<run dir> parses an earlier run instead of booting;
BLKPY_XENLAB_SUITE=trixie boots the Xen 4.20 host (its phases) instead of 4.17's;
BLKPY_XENLAB_EXTRA_PHASES=lifecycle adds that phase (BLKPY_XENLAB_LIFECYCLE_ROUNDS, _KINDS:
its rounds and kinds), as CI does."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from .boot import BootResult
from .images import BuildError, suite_named
from .lab import DEFAULT_TIMEOUT, run_lab, session_phases
from .results import Check, Figure, parse_checks, parse_figures


@dataclasses.dataclass
class LabRun:
    result: BootResult
    checks: dict[str, Check]
    figures: dict[str, Figure]

    def tail(self) -> str:
        return f"---- serial log tail ({self.result.serial_log}) ----\n{self.result.tail(40)}"


@pytest.fixture(scope="session")
def lab() -> LabRun:
    earlier = os.environ.get("BLKPY_XENLAB_RUN")
    if earlier:
        run_dir = Path(earlier)
        serial = run_dir / "serial.log"
        text = serial.read_text("utf-8", "replace")
        verdict = "PASS" if "LAB-RESULT: PASS" in text else "FAIL"
        result = BootResult(verdict, None, 0.0, serial, run_dir)
    else:
        timeout = float(os.environ.get("BLKPY_XENLAB_TIMEOUT", DEFAULT_TIMEOUT))
        try:
            suite = suite_named().name
            phases, phase_env = session_phases(suite)
            result = run_lab(phases, timeout, suite=suite, phase_env=phase_env)
        except BuildError as exc:
            pytest.fail(f"xenlab images could not be built: {exc}", pytrace=False)
        except ValueError as exc:
            pytest.fail(str(exc), pytrace=False)
    text = result.text
    return LabRun(result, parse_checks(text), parse_figures(text))
