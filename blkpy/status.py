"""What a running `blkpy serve` publishes about itself, for operators and their tools.

- A status file per device, ``<run dir>/vbd-<domid>-<devid>.json`` (JSON, replaced
  atomically about once a second): what is served and how, and blkback-named counters
  with the rates over the last interval. `blkpy list` and `blkpy stats` read these.
- tapdisk3's statistics page, ``<shm dir>/td3-<pid>/vbd-<domid>-<devid>``: the 96-byte
  ``vbd3_stats`` version 1 layout libxenstat (Xen >= 4.19) reads for a ``vbd3`` backend
  whose ``kthread-pid`` node names our process, so `xentop -x` shows our counters
  (request and sector counts; OO as blkback's "out of requests").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
import time
from pathlib import Path

RUN_DIR_ENV = "BLKPY_RUN_DIR"
DEFAULT_RUN_DIR = "/run/blkpy"
SHM_DIR_ENV = "BLKPY_SHM_DIR"
DEFAULT_SHM_DIR = "/dev/shm"

#: struct vbd3_stats (tapdisk-metrics-stats.h): version, pad, then 11 u64 counters
VBD3_STATS = struct.Struct("<II11Q")
VBD3_STATS_VERSION = 1
#: blkback's statistics names (its sysfs files), in the order `blkpy stats` prints them
COUNTERS = ("oo_req", "rd_req", "wr_req", "f_req", "ds_req", "rd_sect", "wr_sect", "errors",
            "eopnotsupp")


def run_dir() -> Path:
    return Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


def shm_dir() -> Path:
    return Path(os.environ.get(SHM_DIR_ENV) or DEFAULT_SHM_DIR)


@dataclasses.dataclass
class DeviceStatus:
    domid: int
    devid: int
    backend_path: str
    pid: int
    image: str
    format: str
    state: str = "InitWait"
    queues: int = 0
    ring_order: int = 0
    grant_mode: str = ""
    engine: str = ""
    started: float = 0.0
    updated: float = 0.0
    counters: dict[str, int] = dataclasses.field(default_factory=dict)
    #: over the last interval: IOPS, and MB/s read and written (10**6 bytes)
    iops: float = 0.0
    read_mb_s: float = 0.0
    write_mb_s: float = 0.0

    @property
    def uptime(self) -> float:
        return max(0.0, self.updated - self.started)

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> DeviceStatus:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})  # type: ignore[arg-type]


def status_path(directory: Path, domid: int, devid: int) -> Path:
    return directory / f"vbd-{domid}-{devid}.json"


def vbd3_stats_path(directory: Path, pid: int, domid: int, devid: int) -> Path:
    return directory / f"td3-{pid}" / f"vbd-{domid}-{devid}"


def vbd3_stats(counters: dict[str, int]) -> bytes:
    """The vbd3_stats page for ``counters`` (submitted and completed are the same: a
    request is counted when it is answered)."""
    rd, wr = counters.get("rd_req", 0), counters.get("wr_req", 0)
    return VBD3_STATS.pack(
        VBD3_STATS_VERSION, 0,
        counters.get("oo_req", 0), rd, rd, counters.get("rd_sect", 0), 0,
        wr, wr, counters.get("wr_sect", 0), 0, counters.get("errors", 0), 0,
    )


class StatusPublisher:
    """Keeps one device's status file and vbd3 statistics page up to date."""

    def __init__(self, status: DeviceStatus, directory: Path | None = None,
                 shm: Path | None = None) -> None:
        self.status = status
        self.directory = directory or run_dir()
        self.shm = shm or shm_dir()
        self.path = status_path(self.directory, status.domid, status.devid)
        self.stats_path = vbd3_stats_path(self.shm, status.pid, status.domid, status.devid)
        self._last: tuple[float, dict[str, int]] | None = None
        self.failed = False

    def update(self, counters: dict[str, int], now: float | None = None, **info: object) -> None:
        """Publish ``counters`` (and changed ``info`` fields such as state or queues).
        A status directory we cannot write is reported once, by the caller's log, and
        never stops the device."""
        now = time.time() if now is None else now
        st = self.status
        for name, value in info.items():
            setattr(st, name, value)
        if self._last is not None and now > self._last[0]:
            dt = now - self._last[0]
            old = self._last[1]

            def delta(name: str) -> int:
                return max(0, counters.get(name, 0) - old.get(name, 0))

            st.iops = (delta("rd_req") + delta("wr_req") + delta("f_req") + delta("ds_req")) / dt
            st.read_mb_s = delta("rd_sect") * 512 / dt / 1e6
            st.write_mb_s = delta("wr_sect") * 512 / dt / 1e6
        self._last = (now, dict(counters))
        st.counters = dict(counters)
        st.updated = now
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(st.to_json()))
            os.replace(tmp, self.path)
            self.stats_path.parent.mkdir(parents=True, exist_ok=True)
            # One write of the whole page: xentop freads it whenever it likes.
            fd = os.open(self.stats_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.pwrite(fd, vbd3_stats(counters), 0)
            finally:
                os.close(fd)
        except OSError:
            self.failed = True
            raise

    def close(self) -> None:
        for path in (self.path, self.stats_path):
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            self.stats_path.parent.rmdir()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (someone else's counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_all(directory: Path | None = None) -> list[DeviceStatus]:
    """Every device a live `blkpy serve` publishes (files of dead processes are
    skipped: a serve killed with SIGKILL cannot remove its own)."""
    directory = directory or run_dir()
    found = []
    for path in sorted(directory.glob("vbd-*-*.json")):
        try:
            status = DeviceStatus.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if pid_alive(int(status.pid)):
            found.append(status)
    return sorted(found, key=lambda s: (s.domid, s.devid))


def find(domid: int, devid: int, directory: Path | None = None) -> DeviceStatus | None:
    for status in read_all(directory):
        if status.domid == domid and status.devid == devid:
            return status
    return None
