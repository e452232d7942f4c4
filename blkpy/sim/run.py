"""`blkpy sim run`: a whole simulated host serving one disk to one guest workload.

Starts the simulated xenstored, adds the disk the way libxl does, launches `blkpy serve`
as a subprocess, connects the simulated blkfront, runs the workload, removes the disk and
checks that the backend left cleanly. The result says what happened and whether anything
went wrong (data mismatch, protocol error, backend failure).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator

from blkpy.backends import DiskError, check_target, network_format, probe_format
from blkpy.sim.frontend import Frontend
from blkpy.sim.host import BackendProcess, SimHost
from blkpy.sim.toolstack import DiskSpec
from blkpy.sim.workloads import run_workload
from blkpy.xenbus import XenbusState

GUEST_DOMID = 1
DEVID = 51712  # xvda
DEFAULT_IMAGE_SIZE = 64 << 20


@dataclasses.dataclass
class SimRunConfig:
    image: str | None = None
    fmt: str | None = None
    workload: str = "verify"
    requests: int = 2000
    abi: str = "x86_64-abi"
    ring_order: int = 0
    indirect_segments: int = 32
    readonly: bool = False
    persistent: bool = True
    queue_depth: int = 32
    seed: int = 1
    serve_args: tuple[str, ...] = ()


@dataclasses.dataclass
class SimRunResult:
    config: dict[str, object]
    disk: dict[str, object]
    workload: dict[str, object]
    report: str
    backend: dict[str, object]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


@contextlib.contextmanager
def _image(config: SimRunConfig) -> Iterator[tuple[str, str]]:
    """The image to serve and its format (a temporary sparse raw image by default)."""
    if config.image is None:
        with tempfile.TemporaryDirectory(prefix="blkpy-sim-") as tmp:
            path = os.path.join(tmp, "disk.raw")
            with open(path, "wb") as f:
                f.truncate(DEFAULT_IMAGE_SIZE)
            yield path, "raw"
        return
    network = network_format(config.image)
    if network:  # a server's export: nothing to look at here, the target must parse
        check_target(config.image, network)
        yield config.image, network
        return
    if not os.path.isfile(config.image) and not os.path.exists(config.image):
        raise DiskError(f"cannot open {config.image}: No such file or directory")
    # The operator's own file: sniffing its header is fine here, `serve` never does.
    yield config.image, config.fmt or probe_format(config.image)


def remove_and_check(host: SimHost, spec: DiskSpec, backend: BackendProcess) -> list[str]:
    """Remove the disk as libxl does and list what the backend got wrong on the way out:
    Closed too late, a non-zero exit, an exception in its log, grants left mapped."""
    problems = []
    if not host.remove_disk(spec, timeout=10):
        problems.append("backend did not reach Closed within libxl's 10 s")
    status = backend.wait(10)
    if status != 0:
        problems.append(f"backend exited with status {status}")
    log = backend.log()
    if "Traceback" in log:
        problems.append("backend raised an exception:\n" + log[-2000:])
    platform = backend.stats().get("platform", {})
    if isinstance(platform, dict) and (
        platform.get("pages_mapped") != platform.get("pages_unmapped")
    ):
        problems.append(f"backend left grants mapped: {platform}")
    return problems


def run(config: SimRunConfig) -> SimRunResult:
    problems: list[str] = []
    with _image(config) as (path, fmt), SimHost(serve_args=list(config.serve_args)) as host:
        guest = host.create_guest(GUEST_DOMID)
        target = path if fmt == network_format(path) else f"{fmt}:{path}"
        spec = DiskSpec(GUEST_DOMID, DEVID, "xvda", target, readonly=config.readonly,
                        protocol=config.abi)
        backend = host.add_disk(spec)
        assert backend is not None
        frontend = Frontend(guest, host.guest_xenstore(GUEST_DOMID), DEVID, abi=config.abi,
                            max_ring_page_order=config.ring_order,
                            max_indirect_segments=config.indirect_segments,
                            persistent=config.persistent)
        summary: dict[str, object] = {}
        disk: dict[str, object] = {}
        report = ""
        try:
            if not host.wait_backend_state(spec, XenbusState.INIT_WAIT, timeout=30):
                raise RuntimeError("backend never reached InitWait: " + backend.log()[-500:])
            info = frontend.connect(timeout=30)
            disk = dataclasses.asdict(info)
            result = run_workload(frontend, config.workload, requests=config.requests,
                                  seed=config.seed, queue_depth=config.queue_depth,
                                  zeroed=config.image is None)
            summary = result.as_dict()
            report = result.to_text()
            if not result.ok:
                problems.append(f"workload: {result.errors} unexpected errors, "
                                f"{result.mismatches} mismatches")
                problems += [f"protocol: {e}" for e in result.protocol_errors]
            problems += [f"protocol: {e}" for e in frontend.close(timeout=30)]
        except Exception as exc:  # a failed run is reported, with the backend's log
            problems.append(f"{type(exc).__name__}: {exc}")
        problems += remove_and_check(host, spec, backend)
        stats = backend.stats()
        return SimRunResult(
            config={**dataclasses.asdict(config), "image": path, "fmt": fmt},
            disk=disk, workload=summary, report=report, backend=stats, problems=problems,
        )
