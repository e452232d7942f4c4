"""What the hotplug script does for one device, given its backend path.

``add`` (libxl runs it once the backend reached InitWait): check what the operator stated in
``params`` -- the format prefix and an image that exists and can be opened with the disk's
mode -- and answer ``hotplug-status=connected``, or ``hotplug-error`` + ``hotplug-status=error``
(libxl logs the error and fails the attach when the script exits non-zero).

``remove`` (libxl runs it after the backend reached Closed): make sure the ``blkpy serve`` of
the device is gone; serve exits by itself once the device is offline and closed, so this waits
a little, then terminates it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import stat
import time
from collections.abc import Callable

from blkpy.backends import NETWORK_FORMATS, DiskError, check_target, network_format
from blkpy.hotplug import BACKEND_KINDS, untap
from blkpy.xenstore.client import XenstoreClient

FORMATS = ("raw", "qcow2")
#: how long ``remove`` lets serve finish on its own before SIGTERM, then before SIGKILL
REMOVE_GRACE_S = 5.0
TERM_GRACE_S = 10.0


class HotplugError(Exception):
    """The device cannot be served as configured: one line for the operator."""


@dataclasses.dataclass(frozen=True)
class DiskParams:
    fmt: str
    image: str


def parse_params(params: str) -> DiskParams:
    """``[raw:|qcow2:]/abs/path``. The format is what the operator wrote, never guessed
    from the image's contents; anything before a colon that looks like a format name but
    is not one we serve is refused (rather than taken as part of a path). A network target
    (``nbd:``, ``rbd:``...) is checked for syntax only: its serve, which reached InitWait
    before libxl runs this script, has opened it already."""
    params = untap(params)
    network = network_format(params)
    if network:
        try:
            check_target(params, network)
        except DiskError as exc:
            raise HotplugError(str(exc)) from None
        return DiskParams(network, params)
    head, sep, rest = params.partition(":")
    if sep and head in FORMATS:
        fmt, image = head, rest
    elif sep and head.isalnum() and "/" not in head:
        raise HotplugError(f"unsupported image format {head!r} in params {params!r} "
                           f"(blkpy serves {', '.join(f + ':' for f in FORMATS)})")
    else:
        fmt, image = "raw", params
    if not image:
        raise HotplugError("params is empty: the xl disk line needs target=[raw:|qcow2:]PATH")
    if not image.startswith("/"):
        raise HotplugError(f"image path {image!r} is not absolute")
    return DiskParams(fmt, image)


def check_image(disk: DiskParams, writable: bool) -> None:
    try:
        st = os.stat(disk.image)
    except OSError as exc:
        raise HotplugError(f"image {disk.image}: {exc.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise HotplugError(f"image {disk.image} is neither a regular file nor a block device")
    if not os.access(disk.image, os.R_OK | (os.W_OK if writable else 0)):
        raise HotplugError(f"image {disk.image} is not {'writable' if writable else 'readable'}")


def hotplug_add(xs: XenstoreClient, backend: str) -> DiskParams:
    """Validate the device's params and write hotplug-status; raise HotplugError (after
    writing hotplug-error/hotplug-status=error) when it cannot be served."""
    try:
        if xs.read_str(backend) is None:
            raise HotplugError(f"backend directory {backend} does not exist")
        disk = parse_params(xs.read_str(f"{backend}/params", "") or "")
        if disk.fmt not in NETWORK_FORMATS:
            check_image(disk, writable="w" in (xs.read_str(f"{backend}/mode", "r") or "r"))
    except HotplugError as exc:
        _write_error(xs, backend, str(exc))
        raise

    def connected(tx: int) -> None:
        xs.write(f"{backend}/physical-device-path", disk.image, tx)
        xs.write(f"{backend}/hotplug-status", "connected", tx)
        xs.rm(f"{backend}/hotplug-error", tx)

    xs.run_transaction(connected)
    return disk


def _write_error(xs: XenstoreClient, backend: str, message: str) -> None:
    if xs.read_str(backend) is None:
        return  # nothing to report into: libxl still logs our stderr

    def failed(tx: int) -> None:
        xs.write(f"{backend}/hotplug-error", message, tx)
        xs.write(f"{backend}/hotplug-status", "error", tx)

    xs.run_transaction(failed)


def serve_pid(xs: XenstoreClient, backend: str) -> int | None:
    """The pid in ``kthread-pid`` if it is still a ``blkpy serve`` of this device (a pid
    may have been reused since serve wrote it)."""
    text = (xs.read_str(f"{backend}/kthread-pid") or "").strip()
    if not text.isdigit():
        return None
    pid = int(text)
    return pid if is_serve_of(pid, backend) else None


def is_serve_of(pid: int, backend: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    relative = backend.split("/", 4)[-1] if backend.startswith("/local/domain/") else backend
    return "serve" in argv and any(a in (backend, relative) for a in argv)


def stop_process(pid: int, is_ours: Callable[[], bool], grace: float, term_grace: float) -> bool:
    """Wait ``grace`` s for ``pid`` to exit, then SIGTERM, then SIGKILL after ``term_grace``.
    True if it is gone. ``is_ours()`` is rechecked so a reused pid is never signalled."""
    for sig, wait in ((None, grace), (signal.SIGTERM, term_grace), (signal.SIGKILL, 2.0)):
        if sig is not None:
            if not is_ours():
                return True
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not is_ours():
                return True
            time.sleep(0.1)
    return not is_ours()


def hotplug_remove(xs: XenstoreClient, backend: str, grace: float = REMOVE_GRACE_S) -> str:
    """Make sure no serve process of the device is left; returns what was done."""
    pid = serve_pid(xs, backend)
    if pid is None:
        return "no serve process left"
    if stop_process(pid, lambda: is_serve_of(pid, backend), grace, TERM_GRACE_S):
        return f"serve pid {pid} is gone"
    raise HotplugError(f"serve pid {pid} of {backend} did not exit")


def restart_serves(xs: XenstoreClient, backend_domid: int, device: tuple[int, int] | None,
                   timeout: float) -> list[str]:
    """Hand devices over to new serves (an upgrade): the hotplug daemon, asked through a
    ``blkpy-restart`` node, starts a new serve from the code on disk; once loaded, that
    one has the old serve drain and exit (SIGUSR2), and takes the rings over. One line
    per device: the pids, and how long until the successor took over."""
    roots = [f"/local/domain/{backend_domid}/backend/{kind}" for kind in BACKEND_KINDS]
    if device is not None:
        backends = [f"{root}/{device[0]}/{device[1]}" for root in roots
                    if xs.read_str(f"{root}/{device[0]}/{device[1]}") is not None][:1]
        if not backends:
            raise HotplugError(f"no block device {device[1]} of domain {device[0]}")
    else:
        backends = [f"{root}/{d}/{v}" for root in roots for d in xs.children(root)
                    for v in xs.children(f"{root}/{d}")]
    lines = []
    for backend in backends:
        old = serve_pid(xs, backend)
        if old is None:
            if device is not None:
                raise HotplugError(f"{backend}: no blkpy serve runs it")
            continue
        start = time.monotonic()
        xs.write(f"{backend}/blkpy-restart", str(old))  # the daemon starts the successor
        deadline = start + timeout
        new = None
        while time.monotonic() < deadline:
            pid = serve_pid(xs, backend)
            if pid is not None and pid != old:
                new = pid
                break
            time.sleep(0.01)
        if new is None:
            raise HotplugError(f"{backend}: no successor took over within {timeout:g} s "
                               "(is the hotplug daemon running?)")
        lines.append(f"{backend}: serve pid {old} handed over to pid {new} "
                     f"in {(time.monotonic() - start) * 1000:.0f} ms")
    return lines

