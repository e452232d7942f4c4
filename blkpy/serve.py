"""`blkpy serve`: one backend process for one virtual block device.

This is the control plane: it follows the handshake in xenstore (through the sans-IO
``BackendStateMachine``), connects rings when the frontend publishes them, and runs one
asyncio loop that wakes the data path (``Vbd``) on event-channel and I/O-completion fds.
Everything here is platform-neutral: the platform object supplies grants, event channels
and the xenstore transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import gc
import io
import json
import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiofiles
import aiofiles.os

from blkpy import heap, native_table, rehearsal, ring
from blkpy.backends import Disk, DiskError, load_format, network_format, open_disk
from blkpy.backends.lock import ImageBusy, ImageLock, lock_image
from blkpy.defaults import (
    EXIT_HANDED_OVER,
    EXIT_TAKEOVER_FAILED,
    MAX_PERSISTENT_GRANTS,
    MAX_QUEUES_DEFAULT,
    POLL_US_DEFAULT,
)
from blkpy.engine import make_engine
from blkpy.fastpath import add_counters
from blkpy.grants import GrantMapper
from blkpy.hotplug import untap
from blkpy.journal import JournalError, RingJournal
from blkpy.laps import Laps
from blkpy.platform import GrantMapping, Platform, PlatformError
from blkpy.qos import QosError, QosState, parse_limits
from blkpy.ratelimit import RateLimitedLog
from blkpy.requests import DiskGeometry
from blkpy.status import (
    COUNTERS,
    RUN_DIR_ENV,
    SHM_DIR_ENV,
    DeviceStatus,
    StatusPublisher,
)
from blkpy.turn import HostTurn
from blkpy.vbd import ReadyThread, Vbd
from blkpy.xenbus import (
    Action,
    BackendStateMachine,
    Connect,
    Disconnect,
    Exit,
    Fatal,
    PublishFeatures,
    Snapshot,
    SwitchState,
    XenbusState,
    parse_state,
)
from blkpy.xenstore.client import XenstoreClient, XenstoreError

log = logging.getLogger("blkpy.serve")

#: format prefixes an operator may put in front of the image path in the xl target
#: (libxl copies it into `params`); "aio" is what libxl writes for raw qdisk targets.
FORMAT_PREFIXES = {"raw": "raw", "aio": "raw", "qcow2": "qcow2"}
STATS_FILE_ENV = "BLKPY_STATS_FILE"
RESIZE_CHECK_S = 2.0  # how often a connected device looks for a grown image
STATUS_INTERVAL_S = 1.0  # how often `blkpy list`/xentop figures are refreshed
#: beside the journals: the grefs each queue keeps mapped and the regions whose places the
#: disk learnt, for a dead serve's successor to map and learn before it serves (rewritten
#: when they change, at most once a status interval)
SUCCESSOR_FILE = "successor.json"
#: in the run directory: the lock an upgrade holds while it hands over (blkpy.turn)
HANDOVER_TURN_FILE = "handover.lock"
#: how long a connecting frontend waits for another process to let go of the image (the
#: serve of the guest's old domain during a migration to this host flushing and closing)
IMAGE_WAIT_S = 60.0
#: formats whose image is a local file or device, locked while a serve has it open
LOCKED_FORMATS = ("raw", "qcow2")
#: how long a serve asked to get ready for a hand-over waits for the word to do it
HANDOVER_GO_S = 60.0
#: how long a serve that handed its device over waits, before it exits, for its successor
#: to serve the rings (an exit's unmapping took the CPU from the successor's attach)
HANDOVER_EXIT_WAIT_S = 5.0
#: how long after a takeover its successor lets the predecessor exit and trims its heap
TAKEOVER_SETTLE_S = 1.0



class ServeError(Exception):
    """A problem the operator must fix (bad backend node, missing image...): one line."""


class ConnectError(Exception):
    """The frontend's nodes or grants are unusable: the device goes to Closing."""


@dataclasses.dataclass(frozen=True)
class ConnectPlan:
    """What the frontend published for its rings, checked: one (ring grant refs, event
    channel port) pair per queue."""

    protocol: str
    abi: ring.Abi
    persistent: bool
    order: int | None
    rings: list[tuple[list[int], int]]


@dataclasses.dataclass
class ServeOptions:
    fmt: str | None = None
    image: str | None = None
    engine: str = "auto"
    grant_mode: str = "auto"
    persistent: bool = True
    max_persistent_grants: int = MAX_PERSISTENT_GRANTS
    max_indirect_segments: int = 256
    max_ring_page_order: int = ring.MAX_RING_PAGE_ORDER
    max_queues: int = MAX_QUEUES_DEFAULT
    poll_us: int = POLL_US_DEFAULT
    sector_size: int = 512
    direct_io: bool = False
    #: take over a connected device whose serve died (its rings' journals) instead of
    #: starting the handshake
    resume: bool = False
    #: a running serve of the device to replace (an upgrade): hand-over, then resume
    replace: int | None = None
    #: a standby successor: wait for the hotplug daemon's word on this pipe before taking
    #: the device over (``--resume``), or exit at its end of file
    standby_fd: int | None = None
    qcow2_cache_size: int = 4 << 20
    stats_file: str | None = None


def parse_params(params: str) -> tuple[str, str]:
    """Split the `params` node into (format, path). The format is only what the operator
    wrote in front of the path, never a guess from the image's contents."""
    params = untap(params)
    head, sep, rest = params.partition(":")
    if sep and head in FORMAT_PREFIXES:
        return FORMAT_PREFIXES[head], rest
    network = network_format(params)
    if network:  # its client parses the whole target, scheme included
        return network, params
    return "raw", params


def choose_grant_mode(requested: str, persistent: bool) -> str:
    """``auto``: keep persistent grants mapped when the frontend agreed to them (no map
    or unmap per request once warm); otherwise copy, which costs one hypercall per batch
    and direction instead of a map, an unmap and a TLB flush per page (bench/grant_modes.py
    measures the three)."""
    if requested != "auto":
        return requested
    return "map" if persistent else "copy"


def _uint(value: str | None, what: str, limit: int = 2**32 - 1) -> int:
    """A decimal node written by the (hostile) frontend."""
    if value is None:
        raise ConnectError(f"frontend node {what} is missing")
    text = value.strip()
    # ASCII digits only: str.isdigit() also passes "²" (int() then raises) and "١٢" (which
    # int() reads as 12), neither of which a Linux backend's scanf would take.
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or int(text) > limit:
        raise ConnectError(f"frontend node {what}={value[:32]!r} is not a valid number")
    return int(text)


class DeviceServer:
    """Serves backend directory ``backend_path`` until the device goes away."""

    def __init__(self, platform: Platform, xs: XenstoreClient, backend_path: str,
                 options: ServeOptions | None = None, open_image: bool = True) -> None:
        """``open_image`` False: everything but the image (``open_image()`` opens it), for
        a successor that gets ready while its predecessor still has the device."""
        self.platform = platform
        self.xs = xs
        self.opts = options or ServeOptions()
        domid = platform.backend_domid
        if not backend_path.startswith("/"):
            backend_path = f"/local/domain/{domid}/{backend_path}"
        self.path = backend_path.rstrip("/")
        self.machine = BackendStateMachine()
        self.vbds: list[Vbd] = []
        # Counters of earlier connections, summed per queue number: a device whose guest
        # reconnects a thousand times keeps one entry per queue, not one per connection.
        self._past_stats: list[dict[str, int]] = []
        self._past_loops: list[dict[str, int]] = []
        self._ring_maps: list[GrantMapping] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._resize_timer: asyncio.TimerHandle | None = None
        self._bad_log = RateLimitedLog(logging.getLogger("blkpy.vbd"))
        # What the guest drives (state switches, connects, failed connects): it can cycle
        # its state node as fast as xenstored takes writes.
        self._guest_log = RateLimitedLog(log)
        self._read_backend_nodes()
        #: the image's lock (backends.lock) while the disk is open; ``_image_pending``: the
        #: disk is only a read-only look until the frontend connects and the lock is ours
        self._image_lock: ImageLock | None = None
        self._image_pending = False
        run_dir, self._shm_dir = self.platform.state_dirs()
        self._run_dir = Path(os.environ.get(RUN_DIR_ENV) or run_dir)
        devid = self.path.rsplit("/", 1)[-1]
        self.devid = int(devid) if devid.isascii() and devid.isdigit() else 0
        #: what a successor needs if this process dies: the rings' journals, a qcow2
        #: image's metadata not yet written back
        self._state_dir = self._run_dir / f"vbd-{self.frontend_id}-{self.devid}"
        self.disk: Disk
        if open_image:
            self.open_image()
        else:
            load_format(self.fmt)
        self.qos = QosState()  # the disk's I/O limits, shared by its queues
        self._journals: list[RingJournal] = []
        self._handed_over = False
        self._paused = False
        self._control: asyncio.AbstractServer | None = None
        self._status: StatusPublisher | None = None
        self._status_timer: asyncio.TimerHandle | None = None
        self._link = {"queues": 0, "ring_order": 0, "grant_mode": "", "engine": ""}
        #: read and mapped by ``prepare_takeover`` while the predecessor still serves
        self._watching = False
        self._prepared_snapshot: Snapshot | None = None
        self._prepared_plan: ConnectPlan | None = None
        self._premapped: dict[tuple[int, ...], GrantMapping] = {}
        #: per queue, the predecessor's journal mapped ahead of an upgrade's hand-over
        self._journals_ahead: dict[int, RingJournal] = {}
        self._pages_ahead: dict[int, GrantMapper] = {}
        self._threads_ahead: dict[int, ReadyThread] = {}
        self._turn: HostTurn | None = None  # an upgrade's, until its rings are served
        self._saved_state: dict[str, object] | None = None  # as SUCCESSOR_FILE holds it
        self._disk_open = open_image
        self._runner: asyncio.Runner | None = None
        #: where a takeover's time went, logged after it
        self._timings: list[tuple[int, str]] = []
        self._after_takeover: list[Callable[[], None]] = []
        self._heap_ahead = False  # the heap is faulted in for the takeover (blkpy.heap)
        #: when a hand-over stopped taking requests (time.monotonic(), the system's clock)
        self._stopped_at: float | None = None
        self._signals_handled = False

    # ---- setup ------------------------------------------------------------------------

    def _read_backend_nodes(self) -> None:
        exists, self.frontend, fe_id_raw, mode_raw, discard, params = self.xs.read_many(
            [self.path, *(f"{self.path}/{name}" for name in
                          ("frontend", "frontend-id", "mode", "discard-enable", "params"))])
        if exists is None:
            raise ServeError(f"backend directory {self.path} does not exist")
        fe_id = (fe_id_raw or "").strip()
        # ASCII digits only (int() would raise on "²"), and a guest domid (< DOMID_FIRST_RESERVED)
        if not self.frontend or not (fe_id.isascii() and fe_id.isdigit()) \
                or int(fe_id) >= 0x7FF0:
            raise ServeError(f"{self.path}: frontend/frontend-id nodes missing or invalid")
        self.frontend_id = int(fe_id)
        mode = mode_raw or "r"
        self.readonly = "w" not in mode
        self.discard_enabled = (discard or "1").strip() != "0"
        fmt, image = parse_params(params or "")
        self.image = self.opts.image or image
        self.fmt = self.opts.fmt or fmt
        if not self.image:
            raise ServeError(f"{self.path}: no image (params node empty and no --image)")

    def reread_backend_nodes(self) -> None:
        """Read the backend's nodes again (a standby's may be old), and load the image's
        format if it changed."""
        self._read_backend_nodes()
        load_format(self.fmt)

    def open_image(self) -> None:
        self.disk = self._open_disk()
        self._disk_open = True
        if self.disk.readonly and not self.readonly and not self._image_pending:
            # a read-only NBD export
            log.info("%s: %s is read-only: so is the device", self.path, self.image)
            self.readonly = True

    def _open_disk(self) -> Disk:
        try:
            # a successor of a serve that died applies what that one's memory held
            disk, self._image_lock = self._open_image(self.image, self.fmt,
                                                      take_over=bool(self.opts.resume))
            return disk
        except ImageBusy as exc:
            # Another process still has the image: the serve of the guest's old domain
            # during a migration to this host, which flushes and closes it only once that
            # domain is destroyed, after libxl has created ours. Do not wait here: libxl
            # gives the backend 10 s to reach InitWait. Look at the image read-only (its
            # size) and take it over when the frontend connects (``_wait_for_image``).
            log.info("%s: %s: waiting for it when the frontend connects", self.path, exc)
            self._image_pending = True
            disk, _ = self._open_image(self.image, self.fmt, lock=False, readonly=True)
            return disk

    def _open_image(self, image: str, fmt: str, lock: bool = True,
                    readonly: bool | None = None,
                    take_over: bool = False) -> tuple[Disk, ImageLock | None]:
        """The disk and its lock (None for a network disk or ``lock=False``); raises
        ImageBusy if another process holds the image, ServeError for anything else."""
        readonly = self.readonly if readonly is None else readonly
        held = None
        try:
            if lock and fmt in LOCKED_FORMATS:
                held = lock_image(image, write=not readonly)  # before the first byte is read
            options: dict[str, object] = {}
            if fmt == "raw":
                options = {"sector_size": self.opts.sector_size, "direct": self.opts.direct_io}
            elif fmt == "qcow2":
                options = {"cache_size": self.opts.qcow2_cache_size,
                           "restart_log": str(self._state_dir / "qcow2-metadata"),
                           "take_over": take_over}
            return open_disk(image, fmt, readonly=readonly, **options), held
        except ImageBusy:
            raise
        except DiskError as exc:
            if held is not None:
                held.close()
            raise ServeError(str(exc)) from None

    def _wait_for_image(self) -> None:
        """The frontend connects while another process holds the image: wait for it to
        let go, then open the image for real (the look taken at start may be stale: the
        other writer flushed its metadata since)."""
        lock = ImageLock(self.image, write=not self.readonly)
        start = time.monotonic()
        if not lock.acquire(IMAGE_WAIT_S):
            lock.close()
            raise ConnectError(f"{self.image} is still in use by another process after "
                               f"{IMAGE_WAIT_S:g} s")
        try:
            disk, _ = self._open_image(self.image, self.fmt, lock=False)
        except ServeError as exc:
            lock.close()
            raise ConnectError(str(exc)) from None
        self.disk.close()
        self.disk, self._image_lock, self._image_pending = disk, lock, False
        log.info("%s: %s released by its other user after %.2f s", self.path, self.image,
                 time.monotonic() - start)

    def _close_disk(self) -> None:
        """Close the image, then let go of its lock (a qcow2 image's metadata is written
        back by the close: a process waiting for the lock must find it complete).
        Idempotent: a pause, a hand-over and the teardown all close it."""
        if not self._disk_open:
            return
        self._disk_open = False
        self.disk.close()
        if self._image_lock is not None:
            self._image_lock.close()
            self._image_lock = None

    def _geometry(self) -> DiskGeometry:
        return DiskGeometry(
            sectors=self.disk.size >> ring.SECTOR_SHIFT,
            sector_size=self.disk.sector_size,
            readonly=self.readonly,
            discard=self.discard_enabled and self.disk.can_discard and not self.readonly,
            max_indirect_segments=self.opts.max_indirect_segments,
        )

    # ---- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until the device is removed or SIGTERM; returns the exit status."""
        runner = self._runner or asyncio.Runner()
        with runner:
            self.prepare_loop(runner, signals=True)
            return runner.run(self._main())

    def prepare_loop(self, runner: asyncio.Runner | None = None, signals: bool = False) -> None:
        """Make the event loop now, and with ``signals`` take the serve's signals (a
        successor's guest does not wait for them: under emulation they cost tens of ms).
        A standby, waiting maybe for days, keeps the default signals until it takes over,
        so that a plain SIGTERM still ends it. Idempotent."""
        if self._runner is None:
            self._runner = runner or asyncio.Runner()
            self._loop = self._runner.get_loop()
            self._done = self._loop.create_future()
        if not signals or self._signals_handled:
            return
        assert self._loop is not None
        self._signals_handled = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._on_terminate)
        self._loop.add_signal_handler(signal.SIGUSR1, self._on_stats_signal)
        self._loop.add_signal_handler(signal.SIGHUP, self._check_resize)
        self._loop.add_signal_handler(signal.SIGUSR2, self._on_handover)

    async def _main(self) -> int:
        assert self._loop is not None
        self._resize_timer = self._loop.call_later(RESIZE_CHECK_S, self._periodic_resize)
        self._loop.add_reader(self.xs.fileno(), self._on_xenstore)
        self.start()
        if self.opts.resume or self.opts.replace:
            # a takeover's first requests come first: the status files a second later
            self._loop.call_later(TAKEOVER_SETTLE_S, self._start_status_if_serving)
        else:
            self._start_status()
        await self._start_control()
        self._on_xenstore()
        try:
            return await self._done
        finally:
            self._teardown()
            if self._handed_over:
                # Everything the successor needs is released, and it may be waiting for
                # this exit (an older serve's SIGUSR2 hand-over): skip the event loop's
                # and the interpreter's teardown.
                logging.shutdown()
                os._exit(EXIT_HANDED_OVER)

    def start(self) -> None:
        """Watch what the handshake depends on, publish the features and go to InitWait.
        Then every watch event calls ``step`` (``blkpy fuzz handshake`` calls both
        directly, without the event loop, to run thousands of handshakes in one process)."""
        if self.opts.resume or self.opts.replace:
            # a successor: the guest waits until the rings are served again, so the pid
            # (for tools, not the guest) comes after
            self._watch()
            if not self.opts.replace:  # a dead serve's successor (an upgrade's has them)
                self.take_saved_state()
            snapshot, self._prepared_snapshot = self._prepared_snapshot or self._snapshot(), None
            self._execute(self.machine.resume(snapshot))
            self._prepared_plan = None  # only this connect may use it: later ones read anew
            self._unmap_premapped()
            self.xs.write(f"{self.path}/kthread-pid", str(os.getpid()))
        else:
            self.xs.write(f"{self.path}/kthread-pid", str(os.getpid()))
            self._watch()
            self._execute(self.machine.start())

    def _watch(self) -> None:
        if self._watching:
            return
        self._watching = True
        self.xs.watch_many([(f"{self.frontend}/state", "frontend"),
                            (f"{self.path}/state", "backend"),
                            (f"{self.path}/online", "backend"),
                            ("@releaseDomain", "domains"),
                            (f"{self.path}/qos", "qos")])
        self._read_qos()

    def prepare_takeover(self) -> None:
        """An upgrade's new serve, before it asks the running one to hand over: watch,
        read what the handshake and the rings depend on, and map the rings (a grant may
        be mapped twice), so that the guest waits only for the predecessor's drain, the
        image, the journals and the channels. A frontend that changes anything meanwhile
        fires a watch: the takeover's state machine sees it as it would see it after."""
        self._watch()
        self.rehearse_takeover()
        self._prepared_snapshot = self._snapshot()
        if self._prepared_snapshot.frontend_state != XenbusState.CONNECTED:
            return
        try:
            plan = self._plan_connection()
        except ConnectError:
            return  # the takeover reads again, and says why it cannot connect
        for refs, _ in plan.rings:
            try:
                self._premapped[tuple(refs)] = self.platform.map_grants(
                    self.frontend_id, refs, writable=True)
            except PlatformError:
                break  # mapped at the takeover, which reports what is wrong
        for queue, (refs, _) in enumerate(plan.rings):
            try:  # read once it has let go; what it records meanwhile shows through
                self._journals_ahead[queue] = self._journal(
                    queue, _ring_slots(plan.abi, refs), plan.abi.entry_size, create=False)
            except (OSError, JournalError):
                break  # (none yet, or of another ring): opened at the takeover
        self._threads_ahead = {queue: ReadyThread() for queue in range(len(plan.rings))}
        self.note_timing(f"{len(self._premapped)} ring(s) and {len(self._journals_ahead)} "
                         f"journal(s) mapped ahead, {len(self._threads_ahead)} ring thread(s) "
                         "started ahead")
        self._prepared_plan = plan

    def _log_timings(self) -> None:
        for level, line in self._timings:
            log.log(level, "%s: %s", self.path, line)
        self._timings.clear()

    @property
    def run_dir(self) -> Path:
        return self._run_dir

    def hold_turn(self, turn: HostTurn) -> None:
        """Keep the host's hand-over turn until our rings are served (or the takeover
        failed, or we end)."""
        self._turn = turn

    def _release_turn(self) -> None:
        turn, self._turn = self._turn, None
        if turn is not None:
            turn.release()

    def after_takeover(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the takeover has served a while (TAKEOVER_SETTLE_S), or
        failed, or the serve ends before: an upgrade's predecessor waits for it to exit."""
        self._after_takeover.append(callback)

    def log_handover_window(self, pid: int, stopped_at: float | None) -> None:
        """How long the guest's rings went without a request taken in an upgrade: from
        serve ``pid`` stopping (its CLOCK_MONOTONIC, which is ours) to our first ring
        thread serving. Logged once those threads ran (an after_takeover callback)."""
        started = [v.serving_since for v in self.vbds if v.serving_since is not None]
        if stopped_at is None or not started:
            return
        served = min(started)
        # and on the wall clock (the lab lines the guest's slow requests up with the
        # windows by it, once it has measured the guest's clock against dom0's)
        offset = time.time() - time.monotonic()
        self._guest_log.info("%s: hand-over window %.0f ms (%s to %s UTC): no request taken "
                             "from serve pid %d stopping to our rings served", self.path,
                             (served - stopped_at) * 1000, _utc(stopped_at + offset),
                             _utc(served + offset), pid)

    def _run_after_takeover(self) -> None:
        callbacks, self._after_takeover = self._after_takeover, []
        for callback in callbacks:
            callback()

    def note_timing(self, line: str, level: int = logging.INFO) -> None:
        """Where a takeover's time went: logged once the rings are served."""
        self._timings.append((level, line))

    def map_grants_ahead(self, grants: list[object]) -> None:
        """Map the grefs each queue of the predecessor keeps mapped (an upgrade's "ready"
        answer, a dead serve's SUCCESSOR_FILE), so that our loop serves the first requests in C
        instead of mapping them then, in a process that never ran that code. Only for
        persistent grants, as negotiated."""
        plan = self._prepared_plan
        if plan is None or not plan.persistent \
                or choose_grant_mode(self.opts.grant_mode, True) != "map":
            return
        for queue, grefs in enumerate(grants[:len(plan.rings)]):
            if not isinstance(grefs, list) or not grefs:
                continue
            pages = GrantMapper(self.platform, self.frontend_id, persistent=True,
                                max_persistent=self.opts.max_persistent_grants)
            pages.map_persistent([g for g in grefs if isinstance(g, int)])
            self._pages_ahead[queue] = pages
        if self._pages_ahead:
            self.note_timing(f"{sum(p.persistent_grants for p in self._pages_ahead.values())}"
                             " persistent grants mapped before the rings")

    def learn_regions_ahead(self, regions: object) -> None:
        """Learn where the predecessor's learnt regions live (an upgrade's "ready" answer, a
        dead serve's SUCCESSOR_FILE; the image is open): a qcow2 image's first requests
        are then served in C instead of by Python's path in a process that never ran it
        (in the lab they ended 300-490 ms after a takeover)."""
        if not isinstance(regions, list) or not regions:
            return
        t0 = time.monotonic()
        n = self.disk.learn_regions(regions)
        if n:
            self.note_timing(f"{n} region(s) of the image learnt in "
                             f"{(time.monotonic() - t0) * 1000:.0f} ms before the rings")

    def take_saved_state(self) -> None:
        """A dead serve's successor, its image open: map what that serve's queues kept
        mapped and learn the regions it had learnt, as it last saved them (a gref the
        guest no longer grants is skipped; one it kept unsaved is mapped on first use).
        The connection's plan read for it is the takeover's."""
        saved = self._read_saved_state()
        self.learn_regions_ahead(saved.get("regions"))
        grants = saved.get("grants")
        if not isinstance(grants, list) or not any(grants):
            return
        try:
            self._prepared_plan = self._plan_connection()
        except ConnectError:
            return  # the takeover reads again, and says why it cannot connect
        self.map_grants_ahead(grants)

    def _read_saved_state(self) -> dict[str, object]:
        """What SUCCESSOR_FILE holds now (empty if nothing sane: none saved, a serve of
        an older blkpy, a file that is not ours)."""
        try:
            saved = json.loads((self._state_dir / SUCCESSOR_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return saved if isinstance(saved, dict) else {}

    def _kept_grants(self) -> list[list[int]]:
        """Per queue, the grefs its persistent cache keeps mapped."""
        return [vbd.pages.persistent_grefs() if isinstance(vbd.pages, GrantMapper) else []
                for vbd in self.vbds]

    def _learnt_regions(self) -> list[int]:
        return self.disk.learnt_regions() if self._disk_open else []

    def _save_successor_state(self) -> None:
        """Keep SUCCESSOR_FILE up to date (written anew only when it changed): what
        ``take_saved_state`` of a successor reads if we die."""
        state: dict[str, object] = {"grants": self._kept_grants(),
                                    "regions": self._learnt_regions()}
        if state == self._saved_state:
            return
        path = self._state_dir / SUCCESSOR_FILE
        try:
            tmp = path.with_name(f".{SUCCESSOR_FILE}.tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, path)  # a successor reads the old state or the new, never half
        except OSError as exc:
            log.debug("%s: cannot save the successor's state: %s", self.path, exc)
            return
        self._saved_state = state

    def rehearse_takeover(self) -> list[str]:
        """Run, on throwaway objects, what a takeover runs first after its predecessor
        let go (a ring's attach from its journal, the grant table, a read-only look at the
        image with an engine and a queue's loop and thread on it, a thread's start): a
        fresh process pays for first touches (code pages, numpy's lazy set-ups, new heap
        and thread stacks) once, and
        profiled in the lab they were 100-150 ms of an upgrade's stall under emulation,
        and a standby's first image open took 170-180 ms against 55-60 ms for the next.
        Then the heap the takeover allocates from is faulted in (blkpy.heap) until the
        takeover is over. Done while the predecessor still serves; never fails. What was
        rehearsed."""
        done: list[str] = []
        abi = ring.ABIS[ring.DEFAULT_PROTOCOL]
        try:
            self._state_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self._state_dir) as tmp:
                path, size = Path(tmp) / "rehearsal", ring.ring_size(abi, 0)
                journal = RingJournal(path, size, abi.entry_size)  # a predecessor's
                journal.start(0)
                journal.close()
                journal = RingJournal(path, size, abi.entry_size)  # ours, from it
                try:
                    ring.BackRing(memoryview(bytearray(ring.PAGE_SIZE)), abi, 1,
                                  journal=journal, resume=True)
                finally:
                    journal.close()
            done.append("ring")
        except (OSError, JournalError, ring.RingOverflow) as exc:
            log.debug("%s: no ring rehearsal: %s", self.path, exc)
        GrantMapper(self.platform, self.frontend_id, persistent=True,
                    max_persistent=self.opts.max_persistent_grants)
        done.append("grants")
        done += self._rehearse_image()
        thread = threading.Thread(target=lambda: None, name="blkpy-rehearsal")
        thread.start()
        thread.join()
        done.append("thread")
        # last: the rehearsal's own garbage would take what is faulted in
        if not self._heap_ahead and heap.prefault():
            self._heap_ahead = True
            self.after_takeover(heap.settle)
            done.append("heap")
        self.note_timing(f"rehearsed: {', '.join(done)}", logging.DEBUG)
        return done

    def _rehearse_image(self) -> list[str]:
        """Open the image read-only, without its lock (the predecessor holds it), build
        an engine on it, read two pages, run a queue on a ring of our own on them, learn
        the regions saved for a successor, make the image's extent map ahead, and close
        both; what of it was done. Not a network disk's: that would be a connection to
        its server."""
        if self.fmt not in LOCKED_FORMATS:
            return []
        try:
            look, _ = self._open_image(self.image, self.fmt, lock=False, readonly=True)
        except (ServeError, ImageBusy, OSError) as exc:
            log.debug("%s: no image rehearsal: %s", self.path, exc)
            return []
        done = []
        try:
            engine = make_engine(self.opts.engine, look)
            try:
                if rehearsal.rehearse_reads(engine, look.size):
                    done.append("image")
                # a queue's loop and thread on this engine (their first making in a
                # process took 16-30 ms of the guest's wait under emulation, the next 5)
                if rehearsal.rehearse_queue(
                        self.platform, self.frontend_id, look, engine,
                        grant_mode=choose_grant_mode(self.opts.grant_mode, True),
                        poll_us=self.opts.poll_us if look.native_io() is not None else 0,
                        max_persistent_grants=self.opts.max_persistent_grants):
                    done.append("queue")
            finally:
                engine.close()
            # what a successor learns before the rings (its first run in a process cost
            # 70-110 ms of an upgrade under emulation): the regions saved for it, if any
            regions = self._read_saved_state().get("regions")
            if isinstance(regions, list) and look.learn_regions(regions):
                done.append("regions")
            # and the fresh pages of its extent map, faulted in now, not by that learning
            target = look.native_io()
            if target is not None and target[1] is not None:
                native_table.reserve(target[1].capacity)
                done.append("extents")
        except (OSError, ValueError, DiskError) as exc:
            log.debug("%s: no engine rehearsal: %s", self.path, exc)
        finally:
            look.close()
        return done

    def _journal(self, queue: int, size: int, entry_size: int,
                 create: bool = True) -> RingJournal:
        return RingJournal(self._state_dir / f"queue-{queue}.journal", size, entry_size,
                           create=create)

    def _unmap_premapped(self) -> None:
        for mapping in self._premapped.values():
            mapping.unmap()
        self._premapped.clear()
        for journal in self._journals_ahead.values():
            journal.close()
        self._journals_ahead.clear()
        for pages in self._pages_ahead.values():
            pages.close()
        self._pages_ahead.clear()
        for thread in self._threads_ahead.values():
            thread.cancel()
        self._threads_ahead.clear()

    def _read_qos(self) -> None:
        """The operator's I/O limits (blkpy.qos), applied at once to every queue. A bad
        setting is logged and the limits in force stay."""
        base = f"{self.path}/qos"
        names = self.xs.children(base)
        nodes = {name: self.xs.read_str(f"{base}/{name}") or "" for name in names[:64]}
        try:
            limits = parse_limits(nodes)
        except QosError as exc:
            log.warning("%s: I/O limits unchanged: %s", self.path, exc)
            return
        if limits != self.qos.limits:
            self.qos.configure(limits)
            log.info("%s: I/O limits: %s", self.path,
                     ", ".join(f"{k}={v}" for k, v in limits.to_nodes().items()) or "none")

    def step(self) -> None:
        """A watch fired: re-read the nodes the handshake depends on and act on them."""
        self._execute(self.machine.on_change(self._snapshot()))

    def _finish(self, status: int) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(status)

    def _on_handover(self) -> None:
        """SIGUSR2, for an upgrade by a serve that does not ask through the control
        socket: hand over, and exit; the successor waits for the exit."""
        self._hand_over()
        self._log_timings()
        self._finish(EXIT_HANDED_OVER)

    def _hand_over(self) -> None:
        """Stop taking requests, finish and answer the ones in flight, and release what a
        successor needs (channels, journals, the image and its lock), without a word to
        xenstore; the journals say nothing is owed, and a successor started with
        --resume carries on. The grant mappings are left to this process's exit: the
        successor maps the rings itself, and does not wait for ours to go."""
        if self._handed_over:
            return
        laps = Laps()
        self._handed_over = True
        self._stopped_at = laps.started
        for vbd in self.vbds:
            vbd.stop()
        laps.lap("queues stopped")
        for vbd in self.vbds:
            vbd.drain()
        laps.lap("requests answered")
        for vbd in self.vbds:
            vbd.release_ring()
        laps.lap("channels unbound")
        self._close_disk()
        laps.lap("image closed")
        # The loops, engines, journals and counters go at the exit, once the successor
        # serves (the guest does not wait for them; nothing there touches the rings).
        # The guest waited for every lap: logged after.
        self.note_timing(f"handed the device over: {laps}")
        if self._status_timer is not None:
            self._status_timer.cancel()
        if self._status is not None:  # the successor publishes the device's status
            self._status.close()
            self._status = None

    def _on_terminate(self) -> None:
        if self._handed_over:  # the device is the successor's: say nothing, just go
            self._finish(EXIT_HANDED_OVER)
            return
        log.info("%s: terminating: closing the device", self.path)
        if self._disk_open:  # (a paused or handed-over serve has closed its image)
            self.disk.give_up()
        self._disconnect()
        with contextlib.suppress(XenstoreError, ConnectionError):
            self._write_state(XenbusState.CLOSED)
        self._finish(0)

    def _on_xenstore(self) -> None:
        if self._handed_over:
            return  # the device is the successor's: nothing more goes to xenstore
        try:
            while (events := self.xs.events()) and not self.machine.finished:
                if any(token == "qos" for _, token in events):
                    self._read_qos()
                self.step()
        except ConnectionError as exc:
            log.error("%s: lost xenstore: %s", self.path, exc)
            self._disconnect()
            self._finish(1)

    def _snapshot(self) -> Snapshot:
        fe_state, state, online, exists = self.xs.read_many(
            [f"{self.frontend}/state", f"{self.path}/state", f"{self.path}/online", self.path])
        snap = Snapshot(
            frontend_state=parse_state(fe_state),
            backend_state=parse_state(state),
            online=(online or "0").strip() == "1",
            backend_exists=exists is not None,
        )
        log.debug("%s: frontend %s, backend %s, online %s, exists %s", self.path,
                  snap.frontend_state, snap.backend_state, snap.online, snap.backend_exists)
        return snap

    def _execute(self, actions: list[Action]) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, PublishFeatures):
                self._publish_features()
            elif isinstance(action, SwitchState):
                self._write_state(action.state)
            elif isinstance(action, Connect) and action.resume:
                t0 = time.monotonic()
                try:
                    self._connect(resume=True)
                except (ConnectError, PlatformError, ring.RingOverflow, JournalError) as exc:
                    # Never Closing: the guest's disk would die. Leave everything as the
                    # dead serve left it; the operator (or the next successor) decides.
                    self._release_turn()
                    self._run_after_takeover()
                    log.error("%s: cannot take the device over: %s", self.path, exc)
                    self._disconnect()
                    self._finish(EXIT_TAKEOVER_FAILED)
                    return
                self._release_turn()  # our ring threads serve: the next device's turn
                self._guest_log.info("%s: took the device over (%.0f ms to attach)", self.path,
                                     (time.monotonic() - t0) * 1000)
                # once the first requests are served: the predecessor's exit, the heap's
                # trim and, in an upgrade, the timing lines (each a few ms under emulation)
                # would take the CPU (and the memory map's lock, the GIL) from them; a dead
                # serve's successor logs them at once (it may die within that second too)
                if self.opts.replace:
                    self.after_takeover(self._log_timings)
                else:
                    self._log_timings()
                if self._loop is not None:
                    self._loop.call_later(TAKEOVER_SETTLE_S, self._run_after_takeover)
                else:
                    self._run_after_takeover()
                queue[:0] = self.machine.connected()
            elif isinstance(action, Connect):
                try:
                    self._connect()
                except (ConnectError, PlatformError, ring.RingOverflow) as exc:
                    self._guest_log.error("%s: cannot connect: %s", self.path, exc)
                    queue[:0] = self.machine.failed(str(exc))
                else:
                    queue[:0] = self.machine.connected()
                self._log_timings()
                self._run_after_takeover()  # (a successor whose guest connected anew)
            elif isinstance(action, Disconnect):
                self._disconnect()
            elif isinstance(action, Fatal):
                self._write_error(action.message)
            elif isinstance(action, Exit):
                log.info("%s: device removed", self.path)
                self._finish(0)

    # ---- xenstore writes ----------------------------------------------------------------

    def _write_state(self, state: XenbusState) -> None:
        if self.xs.read_str(self.path) is None:
            return  # our directory is gone: never recreate it
        self._guest_log.info("%s: state %s", self.path, state.name)
        self.xs.write(f"{self.path}/state", str(int(state)))

    def _write_nodes(self, nodes: dict[str, str]) -> None:
        def write_all(tx: int) -> None:
            for name, value in nodes.items():
                self.xs.write(f"{self.path}/{name}", value, tx=tx)

        self.xs.run_transaction(write_all)

    def _publish_features(self) -> None:
        nodes = {
            "feature-max-indirect-segments": str(self.opts.max_indirect_segments),
            "max-ring-page-order": str(self.opts.max_ring_page_order),
        }
        if self.opts.max_queues > 1:
            nodes["multi-queue-max-queues"] = str(self.opts.max_queues)
        self._write_nodes(nodes)

    def _write_error(self, message: str) -> None:
        # xenbus_dev_fatal's error node: /local/domain/<be>/error/<path below the domain>.
        rel = self.path.split("/", 4)[-1]
        with contextlib.suppress(XenstoreError):
            self.xs.write(f"/local/domain/{self.platform.backend_domid}/error/{rel}/error",
                          f"{errno.EIO} {message}")

    # ---- connect / disconnect -------------------------------------------------------------

    def _plan_connection(self) -> ConnectPlan:
        """Read and check what the frontend published for its rings (ConnectError if
        anything is missing, malformed or beyond our limits). The nodes are read in two
        pipelined batches: the ring's shape, then every queue's grants and channel."""
        protocol_raw, persistent_raw, nq_raw, order_raw = self._frontend_nodes(
            "protocol", "feature-persistent", "multi-queue-num-queues", "ring-page-order")
        protocol = protocol_raw or ring.DEFAULT_PROTOCOL
        if protocol not in ring.ABIS:
            raise ConnectError(f"unknown fe protocol {protocol[:32]!r}")
        abi = ring.ABIS[protocol]
        persistent = self.opts.persistent and (persistent_raw or "0").strip() == "1"
        queues = 1 if nq_raw is None else _uint(nq_raw, "multi-queue-num-queues")
        if not 1 <= queues <= max(1, self.opts.max_queues):
            raise ConnectError(f"frontend asked for {queues} queues (max {self.opts.max_queues})")
        order = None if order_raw is None else _uint(order_raw, "ring-page-order")
        if order is not None and order > self.opts.max_ring_page_order:
            raise ConnectError(f"requested ring page order {order} exceeds max "
                               f"{self.opts.max_ring_page_order}")
        # per queue: its ring-ref names (order 0 may be spelled either way), its channel
        names = ["ring-ref"] if order is None else \
            [*(f"ring-ref{i}" for i in range(1 << order)), *(["ring-ref"] if order == 0 else [])]
        prefixes = [""] if queues == 1 else [f"queue-{q}/" for q in range(queues)]
        values = iter(self._frontend_nodes(*(f"{prefix}{name}" for prefix in prefixes
                                             for name in [*names, "event-channel"])))
        rings = []
        for prefix in prefixes:
            refs = self._ring_refs(prefix, order, {name: next(values) for name in names})
            rings.append((refs, _uint(next(values), f"{prefix}event-channel")))
        # One page in two ring slots (or two rings) would have two consumers race on the
        # same requests; the map itself would succeed, so refuse it here.
        all_refs = [ref for refs, _ in rings for ref in refs]
        if len(set(all_refs)) != len(all_refs):
            raise ConnectError("frontend published the same ring grant twice")
        if len({port for _, port in rings}) != len(rings):
            raise ConnectError("frontend published the same event channel for two queues")
        return ConnectPlan(protocol, abi, persistent, order, rings)

    @staticmethod
    def _ring_refs(prefix: str, order: int | None, raw: dict[str, str | None]) -> list[int]:
        """A queue's ring grant refs, from its ring-ref nodes' values ``raw`` by name."""
        if order is None or (order == 0 and raw["ring-ref0"] is None):  # one page, either
            return [_uint(raw["ring-ref"], f"{prefix}ring-ref")]       # spelling
        return [_uint(raw[f"ring-ref{i}"], f"{prefix}ring-ref{i}") for i in range(1 << order)]

    def _frontend_nodes(self, *names: str) -> list[str | None]:
        return self.xs.read_many([f"{self.frontend}/{name}" for name in names])

    def _connect(self, resume: bool = False) -> None:
        if self._image_pending:
            self._wait_for_image()
        plan, self._prepared_plan = self._prepared_plan or self._plan_connection(), None
        protocol, persistent, order = plan.protocol, plan.persistent, plan.order
        queues = len(plan.rings)
        geometry = self._geometry()
        try:
            for q, (refs, port) in enumerate(plan.rings):
                self._attach_queue(plan.abi, refs, port, geometry, persistent, q, resume)
        except BaseException:
            self._disconnect()
            raise
        finally:
            self._unmap_premapped()
        nodes = {
            "feature-flush-cache": "1",
            "feature-barrier": "1",
            "feature-persistent": "1" if self.opts.persistent else "0",
            "sectors": str(geometry.sectors),
            "info": str(ring.VDISK_READONLY if self.readonly else 0),
            "sector-size": str(geometry.sector_size),
            "physical-sector-size": str(max(geometry.sector_size, 4096)
                                        if self.fmt == "raw" else geometry.sector_size),
            "feature-discard": "1" if geometry.discard else "0",
        }
        if geometry.discard:
            nodes.update({
                "discard-granularity": str(self.disk.discard_granularity),
                "discard-alignment": "0",
                "discard-secure": "0",
            })
        if not resume:  # a successor changes nothing the frontend could see
            self._write_nodes(nodes)
        engine = self.vbds[0].engine if self.vbds else None
        self._link = {
            "queues": queues, "ring_order": order or 0,
            "grant_mode": "persistent" if persistent else choose_grant_mode(
                self.opts.grant_mode, persistent),
            "engine": f"{self.opts.engine}:{engine.loop_io}" if engine else self.opts.engine,
        }
        self._guest_log.info("%s: connected: %s, %d queue(s), ring order %s, persistent=%s, %s %s",
                 self.path, protocol, queues, order or 0, persistent, self.fmt, self.image)

    def _attach_queue(self, abi: ring.Abi, refs: list[int], port: int,
                      geometry: DiskGeometry, persistent: bool, queue: int = 0,
                      resume: bool = False) -> None:
        laps = Laps()
        mapping = self._premapped.pop(tuple(refs), None) \
            or self.platform.map_grants(self.frontend_id, refs, writable=True)
        self._ring_maps.append(mapping)
        laps.lap("ring mapped")
        shape = (_ring_slots(abi, refs), abi.entry_size)
        journal = self._journals_ahead.pop(queue, None)
        if journal is None or (journal.size, journal.entry_size) != shape:
            if journal is not None:
                journal.close()  # mapped for another plan than the one connecting
            journal = self._journal(queue, *shape)
        self._journals.append(journal)
        back = ring.BackRing(mapping.buffer, abi, len(refs), journal=journal, resume=resume)
        laps.lap("journal read")
        evtchn = self.platform.bind_interdomain(self.frontend_id, port)
        laps.lap("channel bound")
        engine = make_engine(self.opts.engine, self.disk)
        laps.lap("engine")
        # The loop spinning on an empty ring watches only its own completions: for a disk
        # only Python's engine can reach a spin would delay every answer by the poll budget
        # and take a CPU from the I/O thread and the server. A network disk's queue (NBD,
        # RBD) is the loop's, but its completions come from the client library's threads
        # (and the server's) on this host, which a spin takes the CPU from: `blkpy bench`
        # measured NBD and RBD at QD1 1.5-2.5x faster without it, and no slower at QD32.
        poll_us = self.opts.poll_us if self.disk.native_io() is not None else 0
        vbd = Vbd(self.platform, self.frontend_id, back, evtchn, self.disk, engine, geometry,
                  persistent=persistent, grant_mode=choose_grant_mode(self.opts.grant_mode,
                                                                      persistent),
                  poll_us=poll_us,
                  max_persistent_grants=self.opts.max_persistent_grants,
                  on_broken=self._on_ring_broken,
                  bad_request_log=self._bad_log, qos=self.qos,
                  pages=self._pages_ahead.pop(queue, None))
        laps.lap("loop made")
        self.vbds.append(vbd)
        ready = self._threads_ahead.pop(queue, None)
        vbd.start(ready)
        laps.lap("thread started" if ready is None else "thread woken")
        # where a takeover's time goes (the guest waits for all of it; logged once the
        # rings are served: under emulation each log line costs ms)
        self.note_timing(f"queue {queue} attached: {laps}", logging.DEBUG)

    def _periodic_resize(self) -> None:
        assert self._loop is not None
        self._check_resize()
        self._resize_timer = self._loop.call_later(RESIZE_CHECK_S, self._periodic_resize)

    def _check_resize(self) -> None:
        """Publish a new size like Linux blkback: `sectors`, then `state` rewritten with
        its current value in the same transaction so the frontend's watch fires."""
        if not self._disk_open:
            return  # paused or handed over; a resume checks the size
        old = self.disk.size
        try:
            new = self.disk.refresh_size()
        except OSError as exc:
            log.warning("%s: cannot re-read the image size: %s", self.path, exc)
            return
        if new == old or not self.vbds:
            return
        log.info("%s: image resized from %d to %d bytes", self.path, old, new)
        geometry = self._geometry()
        for vbd in self.vbds:
            vbd.geometry = geometry
        state = str(int(XenbusState.CONNECTED))
        self._write_nodes({"sectors": str(geometry.sectors), "state": state})

    def _on_ring_broken(self, message: str) -> None:
        # Called on the ring's thread: the state machine belongs to the event loop's.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._ring_broken, message)

    def _ring_broken(self, message: str) -> None:
        self._execute(self.machine.ring_broken(message))

    def _disconnect(self, keep_mappings: bool = False) -> None:
        """Stop every queue, answer what is in flight, unbind the channels; and unmap the
        rings and grants, unless ``keep_mappings`` (a hand-over: the exit does it)."""
        self._past_stats = _per_queue_totals(self._past_stats,
                                             [v.stats.as_dict() for v in self.vbds])
        self._past_loops = _per_queue_totals(self._past_loops,
                                             [v.loop_counters() for v in self.vbds])
        for vbd in self.vbds:
            vbd.close(release_grants=not keep_mappings)
            if not vbd.paused:  # a paused queue's engine is closed already
                vbd.engine.close()
        self.vbds.clear()
        if not keep_mappings:
            for mapping in self._ring_maps:
                mapping.unmap()
        self._ring_maps.clear()
        self._unmap_premapped()
        for journal in self._journals:
            journal.close()
        self._journals.clear()

    def _teardown(self) -> None:
        self._release_turn()
        self._run_after_takeover()  # a takeover that ends within its first second
        if self._resize_timer is not None:
            self._resize_timer.cancel()
        if not self._handed_over and self.machine.finished:  # the device is gone for good
            shutil.rmtree(self._state_dir, ignore_errors=True)
        if self._status_timer is not None:
            self._status_timer.cancel()
        if self._status is not None:
            self._status.close()
        self._disconnect(keep_mappings=self._handed_over)  # (a hand-over's: the exit's)
        if self._loop is not None:
            self._loop.remove_reader(self.xs.fileno())
        self.write_stats()
        self._close_disk()

    # ---- control: pause and resume (tap-ctl's semantics) -------------------------------------

    @property
    def control_path(self) -> Path:
        return self._state_dir / "control"

    async def _start_control(self) -> None:
        """A unix socket taking one JSON command per connection (`blkpy ctl`)."""
        self._state_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()
        try:
            self._control = await asyncio.start_unix_server(self._on_control,
                                                            path=str(self.control_path))
        except OSError as exc:
            log.warning("%s: no control socket (blkpy ctl): %s", self.path, exc)
            return
        os.chmod(self.control_path, 0o600)

    async def _on_control(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                request = json.loads(line)
                if request.get("command") == "handover":
                    reply = await self._handover_command(reader, writer)
                else:
                    reply = self._control_command(request)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            if reply:
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
            if reply.get("released") is True:
                # The successor attaches now: our exit (unmapping, freeing) would take
                # CPU from it. It hangs up once it serves the rings (or dies).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(1), HANDOVER_EXIT_WAIT_S)
        except (TimeoutError, OSError):
            pass  # the client went away: nothing to tell it
        finally:
            writer.close()
            if self._handed_over:
                self._log_timings()
                self._finish(EXIT_HANDED_OVER)

    async def _handover_command(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> dict[str, object]:
        """An upgrade's new serve, in two steps: it connects when it is ready but for the
        image (we answer with our pid and keep serving), then sends one byte when it
        takes its predecessor's priority; we hand over at once and answer again (then
        exit). The byte wakes one waiting read: no connection or request to set up while
        the guest waits. An empty answer: no hand-over (the new serve went away)."""
        taken = {"ok": False, "error": "the device is handed over already", "taken": True}
        if self._handed_over:  # to another new serve: only one may have it
            return taken
        if self._disk_open:
            # what the close at the word would write back, now, while the guest is served
            # (the first upgrade after a round's allocations closed its qcow2 image in 82 ms)
            try:
                self.disk.write_back()
            except OSError as exc:
                log.warning("%s: %s: metadata not written back ahead: %s", self.path,
                            self.image, exc)
        writer.write(json.dumps({"ok": True, "pid": os.getpid(), "grants": self._kept_grants(),
                                 "regions": self._learnt_regions()}).encode() + b"\n")
        await writer.drain()
        if await asyncio.wait_for(reader.read(1), HANDOVER_GO_S) != b"g":
            return {}
        if self._handed_over:
            return taken
        self._hand_over()
        return {"ok": True, "pid": os.getpid(), "released": True, "stopped_at": self._stopped_at}

    def _control_command(self, request: dict[str, object]) -> dict[str, object]:
        if self._handed_over:  # (waiting for its successor to settle before it exits)
            return {"ok": False, "error": "the device is handed over to another serve"}
        command = request.get("command")
        if command == "pause":
            return self._pause()
        if command == "resume":
            image = request.get("image")
            fmt = request.get("format")
            return self._resume(str(image) if image else None, str(fmt) if fmt else None)
        if command == "status":
            return {"ok": True, "paused": self._paused, "image": self.image, "format": self.fmt}
        return {"ok": False, "error": f"unknown command {str(command)[:32]!r}"}

    def _pause(self) -> dict[str, object]:
        """Stop taking requests, finish those in flight, close the image. The rings stay
        mapped and the channels bound: the guest's requests wait in the ring."""
        if not self._paused:
            for vbd in self.vbds:
                vbd.pause()
            self._close_disk()  # the image is free for qemu-img (a snapshot) until resume
            self._paused = True
            log.info("%s: paused; %s closed", self.path, self.image)
        return {"ok": True, "paused": True, "image": self.image}

    def _resume(self, image: str | None, fmt: str | None) -> dict[str, object]:
        """Re-open the image, or another one (a snapshot's overlay), refusing a change of
        size or sector size (the guest was told them), and serve again."""
        if not self._paused:
            return {"ok": False, "error": "not paused"}
        old_size, old_sector = self.disk.size, self.disk.sector_size
        new_image, new_fmt = image or self.image, fmt or self.fmt
        try:
            disk, lock = self._open_image(new_image, new_fmt)
        except (ServeError, ImageBusy) as exc:
            return {"ok": False, "error": str(exc)}
        if (disk.size, disk.sector_size) != (old_size, old_sector):
            disk.close()
            if lock is not None:
                lock.close()
            return {"ok": False, "error": f"{new_image}: {disk.size} bytes in sectors of "
                    f"{disk.sector_size}, the guest has {old_size} in {old_sector}"}
        self.disk, self._image_lock, self._disk_open = disk, lock, True
        for vbd in self.vbds:
            vbd.resume(disk, make_engine(self.opts.engine, disk))
        if (new_image, new_fmt) != (self.image, self.fmt):
            # A successor (crash restart) must open the new image, not the old one.
            self.xs.write(f"{self.path}/params", f"{new_fmt}:{new_image}")
            self.image, self.fmt = new_image, new_fmt
            if self._status is not None:
                self._status.status.image, self._status.status.format = new_image, new_fmt
        self._paused = False
        log.info("%s: resumed on %s (%s)", self.path, self.image, self.fmt)
        return {"ok": True, "paused": False, "image": self.image}

    # ---- statistics -------------------------------------------------------------------------

    def _start_status_if_serving(self) -> None:
        """A takeover's status, a second late: not if it has ended or handed over since."""
        if not (self._handed_over or (self._done is not None and self._done.done())):
            self._start_status()

    def _start_status(self) -> None:
        """Publish this device for `blkpy list`/`blkpy stats` and xentop (blkpy.status)."""
        assert self._loop is not None
        self._status = StatusPublisher(DeviceStatus(
            domid=self.frontend_id, devid=self.devid,
            backend_path=self.path, pid=os.getpid(), image=self.image, format=self.fmt,
            started=time.time()),
            self._run_dir, Path(os.environ.get(SHM_DIR_ENV) or self._shm_dir))
        self._publish_status()

    def _publish_status(self) -> None:
        assert self._loop is not None and self._status is not None
        totals: dict[str, int] = {"qos_delays": self.qos.delays}
        for queue in _per_queue_totals(self._past_stats, [v.stats.as_dict() for v in self.vbds]):
            for name in COUNTERS:
                totals[name] = totals.get(name, 0) + int(queue.get(name, 0))
        try:
            self._status.update(totals, state=self.machine.state.name.title(),
                                **(self._link if self.vbds else {**self._link, "queues": 0}))
        except OSError as exc:
            log.warning("%s: cannot publish the device status (blkpy list): %s",
                        self.path, exc)
            return  # not again: the device serves on regardless
        self._save_successor_state()
        self._status_timer = self._loop.call_later(STATUS_INTERVAL_S, self._publish_status)

    def stats(self) -> dict[str, object]:
        """Counters as JSON: the platform's (the native loops' notifications and wake-ups
        added in), per queue, per native loop, and the process's live Python objects."""
        loops = _per_queue_totals(self._past_loops, [v.loop_counters() for v in self.vbds])
        platform = self.platform.stats.as_dict()
        for name in ("notifies", "wakeups"):
            platform[name] += sum(lp[name] for lp in loops)
        return {
            "platform": platform,
            "queues": _per_queue_totals(self._past_stats,
                                        [v.stats.as_dict() for v in self.vbds]),
            "loops": loops,
            "qos": {"limits": self.qos.limits.to_nodes(), "delays": self.qos.delays},
            # A leak of Python objects shows here long before it adds up to pages of RSS
            # (``blkpy fuzz soak`` watches it across connect/disconnect cycles).
            "process": {"python_objects": len(gc.get_objects())},
        }

    def _stats_path(self) -> str | None:
        return self.opts.stats_file or os.environ.get(STATS_FILE_ENV)

    def write_stats(self) -> None:
        """Dump counters as JSON where BLKPY_STATS_FILE / --stats-file says (at exit)."""
        path = self._stats_path()
        if path:
            with open(f"{path}.tmp", "w") as f:
                json.dump(self.stats(), f)
            os.replace(f"{path}.tmp", path)

    def _on_stats_signal(self) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._dump_stats_async())
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _dump_stats_async(self) -> None:
        """SIGUSR1: the same dump without blocking the data path on a slow filesystem."""
        path = self._stats_path()
        if not path:
            return
        async with aiofiles.open(f"{path}.tmp", "w") as f:
            await f.write(json.dumps(self.stats()))
        await aiofiles.os.replace(f"{path}.tmp", path)


def _per_queue_totals(totals: list[dict[str, int]],
                      counters: list[dict[str, int]]) -> list[dict[str, int]]:
    """``totals`` with each queue's ``counters`` added (a ``max_`` figure stays the
    maximum); a new list, the inputs are left alone."""
    out = [dict(t) for t in totals]
    for q, queue in enumerate(counters):
        if q == len(out):
            out.append({})
        out[q] = add_counters(out[q], queue)
    return out


def serve(backend_path: str, platform: Platform, xenstore_path: str | None,
          options: ServeOptions, connect: Callable[[str], XenstoreClient] | None = None) -> int:
    """Run one device server; raises ServeError for operator mistakes."""
    path = xenstore_path or platform.xenstore_path()
    try:
        xs = (connect or XenstoreClient.connect)(path)
    except OSError as exc:
        raise ServeError(f"cannot connect to xenstore at {path}: {exc}") from None
    with xs:
        if options.standby_fd is not None:
            return _serve_as_standby(platform, xs, backend_path, options, options.standby_fd)
        server = DeviceServer(platform, xs, backend_path, options,
                              open_image=not options.replace)
        if options.replace:
            # Everything is imported, connected and read, the rings mapped, the image's
            # format loaded: only now stop the predecessor, so that the guest waits for
            # its drain and our attach, not for an interpreter start. The image is opened
            # once it has let go of it (a qcow2 image has one writer; its metadata is
            # complete only then).
            server.prepare_takeover()
            server.prepare_loop(signals=True)
            predecessor = _Predecessor(options.replace, server.control_path)
            if predecessor.ready():
                server.map_grants_ahead(predecessor.grants)
            # one hand-over at a time on the host (blkpy.turn), until our rings are served
            turn = HostTurn(server.run_dir / HANDOVER_TURN_FILE)
            waited = turn.take()
            server.hold_turn(turn)
            _take_priority_of(options.replace)
            t0 = time.monotonic()
            how = predecessor.replace()
            server.after_takeover(predecessor.close)
            if waited is None:
                log.warning("%s: handing over without the host's turn (another hand-over "
                            "holds it, or no run directory)", server.path)
            elif waited >= 0.001:
                server.note_timing(f"waited {waited * 1000:.0f} ms for another device's "
                                   "hand-over on this host")
            server.after_takeover(functools.partial(server.log_handover_window, options.replace,
                                                    predecessor.stopped_at))
            laps = Laps()
            server.open_image()
            laps.lap("image opened")
            server.learn_regions_ahead(predecessor.regions)
            laps.lap("regions learnt")
            server.note_timing(f"serve pid {options.replace} handed over in "
                               f"{(laps.started - t0) * 1000:.0f} ms ({how}); {laps}")
        return server.run()


def _utc(wall: float) -> str:
    """A wall-clock time of day to the millisecond."""
    return time.strftime("%H:%M:%S", time.gmtime(wall)) + f".{int(wall * 1000) % 1000:03d}"


def _ring_slots(abi: ring.Abi, refs: list[int]) -> int:
    """Slots of a ring of ``refs`` pages (its journal's size)."""
    return ring.ring_size(abi, len(refs).bit_length() - 1)


def _serve_as_standby(platform: Platform, xs: XenstoreClient, backend_path: str,
                      options: ServeOptions, go: int) -> int:
    """A standby (forked by the hotplug daemon): read the device now, wait until the
    daemon says its serve died, then read what may have changed since (a resume on a
    snapshot's overlay rewrites params), open the image and take the rings over."""
    server = DeviceServer(platform, xs, backend_path, options, open_image=False)
    server.prepare_loop()
    server.rehearse_takeover()
    if not _await_turn(go):
        return 0  # the hotplug daemon no longer needs this standby
    t0 = time.monotonic()
    from blkpy.hotplug.watcher import set_cmdline

    set_cmdline(["blkpy", "serve", backend_path, "--resume"])  # a serve now
    server.reread_backend_nodes()
    t1 = time.monotonic()
    server.open_image()
    server.note_timing(f"standby in service: device read in {(t1 - t0) * 1000:.0f} ms, "
                       f"image opened in {(time.monotonic() - t1) * 1000:.0f} ms")
    return server.run()


def _take_priority_of(pid: int) -> None:
    """An upgrade's new serve may have loaded at a lower priority (the hotplug daemon starts
    it niced, so that the serve still answering the guest keeps the CPU): from now on it is
    the device's serve, at its predecessor's priority."""
    try:
        target, ours = os.getpriority(os.PRIO_PROCESS, pid), os.getpriority(os.PRIO_PROCESS, 0)
        if ours != target:
            os.setpriority(os.PRIO_PROCESS, 0, target)  # this thread; later ones inherit it
            log.info("loaded at niceness %d; now at serve pid %d's, %d", ours, pid, target)
    except ProcessLookupError:
        pass  # gone already: keep ours
    except PermissionError as exc:
        log.warning("cannot take serve pid %d's priority: %s", pid, exc.strerror)


def _await_turn(fd: int) -> bool:
    """A standby (forked by the hotplug daemon, ready but for the image): wait until the
    daemon says the device's serve died (True) or no longer needs it (False: EOF)."""
    try:
        return os.read(fd, 1) == b"g"
    finally:
        os.close(fd)


def _replace(pid: int, control: Path, timeout: float = 30.0) -> str:
    """Have serve ``pid`` hand its device over; returns how it said it was done: an
    answer on its control socket once the device is released (it exits after), or, from
    a serve that does not know that command, its exit after SIGUSR2."""
    predecessor = _Predecessor(pid, control, timeout)
    try:
        return predecessor.replace()
    finally:
        predecessor.close()


class _Predecessor:
    """The serve an upgrade replaces. ``ready()`` connects to its control socket while it
    still serves (it answers with its pid); ``replace()`` then sends the one byte that has
    it hand over, and waits for its answer: or, from a serve that does not know the
    command, sends SIGUSR2 and waits for its exit."""

    def __init__(self, pid: int, control: Path, timeout: float = 30.0) -> None:
        self.pid = pid
        self.control = control
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._replies: io.BufferedReader | None = None
        #: per queue, the grefs it keeps mapped (from its "ready" answer)
        self.grants: list[object] = []
        #: the regions its disk learnt where the guest's data lives
        self.regions: list[object] = []
        #: when it stopped taking requests (its "released" answer; CLOCK_MONOTONIC)
        self.stopped_at: float | None = None

    def ready(self) -> bool:
        """Connect and ask it to get ready; False if it cannot be asked that way (no
        socket, an older serve, another process's socket)."""
        if self._sock is not None:
            return True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.control))
            sock.sendall(json.dumps({"command": "handover"}).encode() + b"\n")
            replies = sock.makefile("rb")
            answer = self._answer(replies.readline())
        except OSError:
            sock.close()
            return False
        except BaseException:  # (ServeError: it handed the device to another serve)
            sock.close()
            raise
        if answer is None:
            sock.close()
            return False
        self._sock, self._replies = sock, replies
        grants, regions = answer.get("grants"), answer.get("regions")
        self.grants = grants if isinstance(grants, list) else []
        self.regions = regions if isinstance(regions, list) else []
        return True

    def _answer(self, line: bytes) -> dict[str, object] | None:
        """Its answer if it is a yes from serve ``pid``; raises ServeError if it handed
        the device over to another new serve (two upgrades of one device at once)."""
        try:
            answer = json.loads(line)
        except ValueError:
            return None
        if not isinstance(answer, dict):
            return None
        if answer.get("taken") is True:
            raise ServeError(f"serve pid {self.pid} has handed its device over to another "
                             "serve")
        if answer.get("ok") is True and answer.get("pid") == self.pid:
            return answer
        return None

    def replace(self) -> str:
        """"released": the connection stays open until ``close()``, which the predecessor
        waits for before it exits (the successor's attach then has the CPU)."""
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self.close()
            return "gone already"  # take over what it left
        released = False
        try:
            if self.ready() and self._go():
                released = True
                return "released"
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGUSR2)
            ready, _, _ = select.select([fd], [], [], self.timeout)
            if not ready:
                raise ServeError(f"serve pid {self.pid} did not hand its device over in "
                                 f"{self.timeout:g} s")
            return "exited"
        finally:
            os.close(fd)
            if not released:
                self.close()

    def _go(self) -> bool:
        """The word to hand over; True once it answered that the device is released
        (False if it died meanwhile: then its exit is what to wait for)."""
        assert self._sock is not None and self._replies is not None
        try:
            self._sock.sendall(b"g")
            answer = self._answer(self._replies.readline())
        except OSError:
            return False
        if answer is None or answer.get("released") is not True:
            return False
        stopped_at = answer.get("stopped_at")
        if isinstance(stopped_at, float) and 0 < time.monotonic() - stopped_at < 60:
            self.stopped_at = stopped_at
        return True

    def close(self) -> None:
        if self._replies is not None:
            self._replies.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._replies = None
