"""The lab's one command: build the images (cached), boot Xen under QEMU with this checkout
shared into dom0, run the dom0 phases, print every check and figure, exit with the verdict.

    python3 -m tests.xenlab.lab build [--suite bookworm|trixie]
    python3 -m tests.xenlab.lab run [--suite bookworm|trixie] [--phases ...] [--timeout SECONDS]

``--suite`` (default ``$BLKPY_XENLAB_SUITE``, else bookworm) picks the host: bookworm is
Xen 4.17 with Debian 12, trixie is Xen 4.20 with Debian 13 (vbd3 and xentop, phase vbd3).

Exit status: 0 PASS, 1 FAIL, 124 timeout, 2 build error. On anything but PASS the tail of the
serial log is printed. Run directories (serial log, guest consoles) are kept under the cache.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
import time
from pathlib import Path

from .boot import ACCELS, CPU_MODEL, BootResult, boot
from .handovers import handover_stalls
from .images import SUITES, BuildError, ImageBuilder, Images, kconfig_value, suite_named
from .results import format_summary, parse_checks, parse_figures
from .staging import REPO, build_domu_initrd, build_native

ALL_PHASES = ["blkback", "func", "life", "qcow2"]
#: phases both hosts run, by default only where SUITE_PHASES says: ``nbd`` (issue 11: a guest
#: whose disks are NBD exports qemu-nbd serves from dom0) took 72-100 s on 4.17, 124-170 s on 4.20
SHARED_PHASES = ["nbd"]
#: the default phases of each host; ``backendtype=tap`` (phase vbd3) needs libxl >= 4.19
SUITE_PHASES = {"bookworm": [*ALL_PHASES, "nbd"], "trixie": ["vbd3"]}
#: phases only run when named: ``stress`` checks the emulated machine itself (dom0/phase-stress.sh);
#: ``lifecycle`` (issue 9: kill, upgrade, save/restore, migrate, live snapshot) takes ~15 min
EXTRA_PHASES = ["stress", "lifecycle"]
DEFAULT_TIMEOUT = 1500.0  # seconds for the whole boot, whatever happens inside
KEEP_RUNS = 8


#: diagnostics dom0 understands (tests/xenlab/dom0/lib.sh), passed with ``--debug``
#: what the lifecycle phase does to its serves, in its default order (phase-lifecycle.sh)
LIFECYCLE_KINDS = ("upgrade", "save", "migrate", "snapshot", "kill")
DEBUG_KNOBS = {
    "cores": "dom0 processes that crash (serves, bash, xenstored...) dump core into the run dir",
    "freshcheck": "memory checkers (dom0/freshcheck.c) run beside each blkpy phase",
    "malloc-check": "serves run with glibc's malloc checking (libc_malloc_debug)",
}


def prepare_run(builder: ImageBuilder, images: Images, phases: list[str],
                debug: list[str] | None = None,
                phase_env: dict[str, str] | None = None) -> Path:
    runs = builder.cache / "runs"
    runs.mkdir(exist_ok=True)
    for old in sorted(runs.iterdir())[:-KEEP_RUNS]:
        shutil.rmtree(old, ignore_errors=True)
    run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if builder.suite.name != "bookworm":  # the run id says which host it was
        run_id += f"-{builder.suite.name}"
    run_dir = runs / run_id
    run_dir.mkdir()
    native = build_native(builder, images)
    (run_dir / "native").mkdir()
    shutil.copy(native, run_dir / "native" / native.name)
    build_domu_initrd(builder, images, run_dir / "domU-initrd.img")
    env = {**xen_build_env(builder, images), **(phase_env or {})}
    (run_dir / "lab.env").write_text(f"LAB_PHASES='{' '.join(phases)}'\n"
                                     f"LAB_DEBUG='{' '.join(debug or [])}'\n"
                                     + "".join(f"{k}='{v}'\n" for k, v in env.items()))
    return run_dir


def xen_build_env(builder: ImageBuilder, images: Images) -> dict[str, str]:
    """What dom0 needs to know of how the hypervisor it runs on was built: LAB_XEN_CONFIG
    (where the Kconfig file came from) and LAB_XEN_SHADOW_PAGING (a PV guest's log-dirty
    mode, i.e. its live migration, needs shadow paging). The lab's own build keeps its
    config beside it; a packaged hypervisor's is /boot/xen-<version>-amd64.config in the
    xen-hypervisor package (not in dom0's image). Empty if there is none."""
    if images.built_xen is not None:
        config_file = images.built_xen.with_name("xen.config")
        name = f"xen-build/{images.built_xen.parent.name}/xen.config"
    else:
        boot_dir = builder.package(f"xen-hypervisor-{builder.suite.xen}-amd64") / "boot"
        configs = sorted(boot_dir.glob("xen-*.config"))
        if not configs:
            return {}
        config_file, name = configs[-1], configs[-1].name
    config = config_file.read_text(errors="replace")
    return {"LAB_XEN_CONFIG": name,
            "LAB_XEN_SHADOW_PAGING": kconfig_value(config, "CONFIG_SHADOW_PAGING")}


def suite_phases(suite: str) -> list[str]:
    """The phases a host runs by default."""
    return list(SUITE_PHASES[suite])


def session_phases(suite: str, env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The phases and phase variables of the pytest session's boot (tests/xenlab/conftest):
    the host's defaults, plus the phases ``BLKPY_XENLAB_EXTRA_PHASES`` names (comma-separated,
    e.g. ``lifecycle`` in CI) and ``BLKPY_XENLAB_LIFECYCLE_ROUNDS``/``_KINDS``/``_BLOCKS`` (as
    ``--lifecycle-rounds``/``--lifecycle-kinds``/``--lifecycle-blocks``)."""
    env = os.environ if env is None else env
    phases = suite_phases(suite)
    extra = [p for p in env.get("BLKPY_XENLAB_EXTRA_PHASES", "").split(",") if p]
    unknown = sorted(set(extra) - set(known_phases(suite)))
    if unknown:
        raise ValueError(f"BLKPY_XENLAB_EXTRA_PHASES: unknown phase(s) {', '.join(unknown)}")
    phases += [p for p in extra if p not in phases]
    phase_env = {}
    for name in ("ROUNDS", "BLOCKS"):
        value = env.get(f"BLKPY_XENLAB_LIFECYCLE_{name}")
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"BLKPY_XENLAB_LIFECYCLE_{name}={value!r}: want a count >= 1")
            phase_env[f"LAB_LIFECYCLE_{name}"] = value
    kinds = [k for k in env.get("BLKPY_XENLAB_LIFECYCLE_KINDS", "").split(",") if k]
    if kinds:
        if set(kinds) - set(LIFECYCLE_KINDS):
            raise ValueError(f"BLKPY_XENLAB_LIFECYCLE_KINDS: some of {','.join(LIFECYCLE_KINDS)}")
        phase_env["LAB_LIFECYCLE_KINDS"] = " ".join(kinds)
    return phases, phase_env


def known_phases(suite: str) -> list[str]:
    """What a host may be asked for: its own, the 4.17 ones (4.20 runs them too), those
    both run and the extras."""
    return list(dict.fromkeys(SUITE_PHASES[suite] + ALL_PHASES + SHARED_PHASES + EXTRA_PHASES))


class LabLock:
    """Only one lab boot at a time on a machine: each QEMU eats a whole core or two."""

    def __init__(self, cache: Path) -> None:
        cache.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(cache / "lab.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def __enter__(self) -> LabLock:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("xenlab: another lab run holds the lock; waiting for it", file=sys.stderr)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def run_lab(phases: list[str], timeout: float, echo: bool = True,
            debug: list[str] | None = None, accel: str = "tcg",
            cpu: str = CPU_MODEL, suite: str | None = None,
            phase_env: dict[str, str] | None = None, smp: int = 2,
            xen_args: str = "", packaged_xen: bool = False) -> BootResult:
    """Build (cached), stage and boot once. Raises BuildError if the images cannot be made."""
    builder = ImageBuilder(suite=suite_named(suite))
    with LabLock(builder.cache):
        t0 = time.monotonic()
        images = builder.build()
        if packaged_xen:  # a comparison: the package's hypervisor, without shadow paging
            images.built_xen = None
        run_dir = prepare_run(builder, images, phases, debug, phase_env)
        prep = time.monotonic() - t0
        load_before = os.getloadavg()
        if echo:
            print(f"xenlab: images + staging {prep:.1f}s; run dir {run_dir}", flush=True)
        result = boot(images, run_dir, REPO, timeout=timeout, echo=echo, accel=accel,
                      cpu=cpu, smp=smp, xen_args=xen_args)
    load_after = os.getloadavg()
    text = result.text
    # QEMU alone keeps about 2 cores busy: a higher load means other work shared the host,
    # and the figures (not the checks) of this run are noisier
    summary = (f"{builder.suite.name} (Xen {builder.suite.xen}) "
               f"verdict {result.verdict} (qemu rc {result.qemu_rc}) boot {result.elapsed:.1f}s "
               f"prep {prep:.1f}s host load (1 min) {load_before[0]:.1f} before, "
               f"{load_after[0]:.1f} after ({os.cpu_count()} cpus)\n"
               f"hypervisor: {'the lab build ' + images.built_xen.parent.name if images.built_xen else 'the package'}\n"
               + format_summary(parse_checks(text), parse_figures(text),
                                handover_stalls(run_dir)))
    (run_dir / "summary.txt").write_text(summary + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.xenlab.lab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    build = sub.add_parser("build", help="build or refresh the cached images")
    run = sub.add_parser("run", help="boot once and run the dom0 phases")
    for p in (build, run):
        p.add_argument("--suite", choices=sorted(SUITES), default=None,
                       help="the host: bookworm (Xen 4.17) or trixie (Xen 4.20); "
                            "default $BLKPY_XENLAB_SUITE, else bookworm")
    run.add_argument("--phases", default=None,
                     help="comma-separated subset of "
                          f"{','.join(sorted({p for ps in SUITE_PHASES.values() for p in ps} | set(SHARED_PHASES + EXTRA_PHASES)))} "
                          "(default: the suite's, " + "; ".join(
                              f"{k}: {','.join(v)}" for k, v in SUITE_PHASES.items()) + ")")
    run.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                     help="hard limit for the boot in seconds (default %(default)s)")
    run.add_argument("--accel", choices=sorted(ACCELS), default="tcg",
                     help="QEMU accelerator (default %(default)s: one host thread per vCPU)")
    run.add_argument("--cpu", default=CPU_MODEL,
                     help="QEMU -cpu model (default %(default)s)")
    run.add_argument("--debug", default="",
                     help="comma-separated diagnostics: " + "; ".join(
                         f"{k}: {v}" for k, v in DEBUG_KNOBS.items()))
    run.add_argument("--smp", type=int, choices=(1, 2), default=2,
                     help="CPUs of the emulated machine, all dom0's (default %(default)s; "
                          "the phases with two-vCPU guests need 2)")
    run.add_argument("--xen-args", default="",
                     help="more options for Xen's command line (e.g. pv-l1tf=false)")
    run.add_argument("--packaged-xen", action="store_true",
                     help="boot the xen-hypervisor package's hypervisor, not the lab's build "
                          "with shadow paging (to compare; xl migrate cannot run on it)")
    run.add_argument("--lifecycle-kinds", default=None,
                     help="the lifecycle phase's kinds, comma-separated, in this order "
                          f"(default: {','.join(LIFECYCLE_KINDS)})")
    run.add_argument("--lifecycle-rounds", type=int, default=None,
                     help="upgrades and kills per disk in the lifecycle phase (default 10)")
    run.add_argument("--lifecycle-blocks", type=int, default=None,
                     help="blocks each of the lifecycle guest's streams rewrites in turn and "
                          "checks at each kind's end (default 16)")
    args = ap.parse_args(argv)
    try:
        suite = suite_named(args.suite)
        if args.cmd == "build":
            images = ImageBuilder(suite=suite).build()
            print(images.root)
            return 0
        known = known_phases(suite.name)
        phases = [p for p in (args.phases or ",".join(suite_phases(suite.name))).split(",") if p]
        unknown = sorted(set(phases) - set(known))
        if unknown:
            print(f"xenlab: unknown phase(s) {', '.join(unknown)} on {suite.name}; "
                  f"known: {', '.join(known)}", file=sys.stderr)
            return 2
        debug = [d for d in args.debug.split(",") if d]
        if set(debug) - set(DEBUG_KNOBS):
            print(f"xenlab: unknown --debug {', '.join(sorted(set(debug) - set(DEBUG_KNOBS)))}; "
                  f"known: {', '.join(DEBUG_KNOBS)}", file=sys.stderr)
            return 2
        phase_env = {}
        if args.lifecycle_kinds is not None:
            kinds = [k for k in args.lifecycle_kinds.split(",") if k]
            if not kinds or set(kinds) - set(LIFECYCLE_KINDS):
                print(f"xenlab: --lifecycle-kinds takes some of {','.join(LIFECYCLE_KINDS)}",
                      file=sys.stderr)
                return 2
            phase_env["LAB_LIFECYCLE_KINDS"] = " ".join(kinds)
        if args.lifecycle_rounds is not None:
            if args.lifecycle_rounds < 1:
                print("xenlab: --lifecycle-rounds must be at least 1", file=sys.stderr)
                return 2
            phase_env["LAB_LIFECYCLE_ROUNDS"] = str(args.lifecycle_rounds)
        if args.lifecycle_blocks is not None:
            if args.lifecycle_blocks < 1:
                print("xenlab: --lifecycle-blocks must be at least 1", file=sys.stderr)
                return 2
            phase_env["LAB_LIFECYCLE_BLOCKS"] = str(args.lifecycle_blocks)
        result = run_lab(phases, args.timeout, debug=debug, accel=args.accel,
                         cpu=args.cpu, suite=suite.name, phase_env=phase_env, smp=args.smp,
                         xen_args=args.xen_args, packaged_xen=args.packaged_xen)
    except BuildError as exc:
        print(f"xenlab: build failed: {exc}", file=sys.stderr)
        return 2
    print((result.run_dir / "summary.txt").read_text(), end="")
    if result.verdict == "PASS":
        return 0
    print(f"---- last serial lines ({result.serial_log}) ----\n{result.tail(80)}")
    return 124 if result.verdict == "TIMEOUT" else 1


if __name__ == "__main__":
    sys.exit(main())
