"""`blkpy hotplug ...`: toolstack integration (the script xl/libxl runs for a blkpy disk)."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator

import click

from blkpy.hotplug import DEFAULT_SCRIPTS_DIR, SCRIPT_NAME

XENSTORE_OPTION = click.option(
    "--xenstore", "xenstore_path", metavar="PATH",
    help="xenstored socket or /dev/xen/xenbus (default: XENSTORED_PATH, then the standard "
         "socket paths).")


@click.group()
def hotplug() -> None:
    """Toolstack integration: hotplug script and the device watcher.

    \b
    Setup in dom0 (xen-blkback must not be loaded: it would claim every vbd):
      blkpy hotplug install
      blkpy hotplug daemon &
    and in the guest config:
      disk = [ 'format=raw,vdev=xvda,access=rw,backendtype=phy,script=block-blkpy,target=qcow2:/images/vm.qcow2' ]
    """


@contextlib.contextmanager
def connected_xenstore(path: str | None) -> Iterator[object]:
    """A connected client; connection and xenstore errors become one-line CLI errors."""
    from blkpy.hotplug.device import HotplugError
    from blkpy.xenstore.client import XenstoreClient, XenstoreError

    try:
        xs = XenstoreClient.connect(path)
    except (ConnectionError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        with xs:
            yield xs
    except HotplugError as exc:
        raise click.ClickException(str(exc)) from None
    except (XenstoreError, ConnectionError) as exc:
        raise click.ClickException(f"xenstore: {exc}") from None


@hotplug.command("add")
@click.argument("backend_path", envvar="XENBUS_PATH")
@XENSTORE_OPTION
def add(backend_path: str, xenstore_path: str | None) -> None:
    """Check the device's image and report hotplug-status (libxl's `add`)."""
    from blkpy.hotplug.device import hotplug_add

    with connected_xenstore(xenstore_path) as xs:
        disk = hotplug_add(xs, backend_path)  # type: ignore[arg-type]
    click.echo(f"{SCRIPT_NAME}: {backend_path}: {disk.fmt} image {disk.image}", err=True)


@hotplug.command("remove")
@click.argument("backend_path", envvar="XENBUS_PATH")
@XENSTORE_OPTION
def remove(backend_path: str, xenstore_path: str | None) -> None:
    """Make sure the device's serve process is gone (libxl's `remove`)."""
    from blkpy.hotplug.device import hotplug_remove

    with connected_xenstore(xenstore_path) as xs:
        what = hotplug_remove(xs, backend_path)  # type: ignore[arg-type]
    click.echo(f"{SCRIPT_NAME}: {backend_path}: {what}", err=True)


@hotplug.command("restart")
@click.argument("domid", type=click.IntRange(1, 0x7FEF), required=False)
@click.argument("devid", type=click.IntRange(0, 2**31 - 1), required=False)
@click.option("--all", "every", is_flag=True, help="Every blkpy device of this host.")
@click.option("--backend-domid", type=click.IntRange(0, 0x7FEF), default=0, show_default=True)
@click.option("--timeout", type=click.FloatRange(0.1), default=30.0, show_default=True,
              help="Seconds to wait for each successor.")
@XENSTORE_OPTION
def restart(domid: int | None, devid: int | None, every: bool, backend_domid: int,
            timeout: float, xenstore_path: str | None) -> None:
    """Upgrade a device's serve under its running guest: the serve drains and hands the
    device over (SIGUSR2), and the hotplug daemon starts a successor from the code now on
    disk, which takes the rings over. The guest sees a pause, never a state change."""
    from blkpy.hotplug.device import restart_serves

    if every == (domid is not None):
        raise click.UsageError("name one device (DOMID DEVID) or give --all")
    if domid is not None and devid is None:
        raise click.UsageError("missing DEVID")
    with connected_xenstore(xenstore_path) as xs:
        for line in restart_serves(xs, backend_domid,  # type: ignore[arg-type]
                                   None if every else (domid, devid), timeout):  # type: ignore[arg-type]
            click.echo(line)


@hotplug.command("install")
@click.option("--dir", "directory", default=DEFAULT_SCRIPTS_DIR, show_default=True,
              type=click.Path(file_okay=False), help="Xen hotplug scripts directory.")
@click.option("--python", "python", metavar="PATH",
              help="Interpreter the script runs blkpy with (default: this one).")
@click.option("--systemd-dir", default=None, type=click.Path(file_okay=False),
              help="Where the blkpy-hotplug.service unit goes (default: /etc/systemd/system "
                   "if it exists).")
@click.option("--no-systemd", is_flag=True, help="Do not install the systemd unit.")
def install(directory: str, python: str | None, systemd_dir: str | None,
            no_systemd: bool) -> None:
    """Install the block-blkpy hotplug script (mode 0755) and the systemd unit that runs
    `blkpy hotplug daemon` (enable it with `systemctl enable --now blkpy-hotplug`)."""
    from blkpy.hotplug.script import DEFAULT_SYSTEMD_DIR, install_script, install_unit

    targets = [(directory, install_script)]
    if not no_systemd:
        if systemd_dir is not None:
            targets.append((systemd_dir, install_unit))
        elif os.path.isdir(DEFAULT_SYSTEMD_DIR):
            targets.append((DEFAULT_SYSTEMD_DIR, install_unit))
    for where, install_one in targets:
        try:
            click.echo(install_one(where, python))
        except OSError as exc:
            raise click.ClickException(f"cannot install into {where}: "
                                       f"{exc.strerror or exc}") from None


@hotplug.command("daemon")
@XENSTORE_OPTION
@click.option("--domid", type=click.IntRange(0, 0x7FEF), default=0, show_default=True,
              help="The backend domain (this one).")
@click.option("--platform", "platform_name", type=click.Choice(["linux", "sim"]),
              default="linux", show_default=True, help="Passed to each serve.")
@click.option("--log-dir", type=click.Path(file_okay=False, exists=True),
              help="Write each serve's stderr to DIR/serve-<domid>-<devid>.log "
                   "(default: this process's stderr).")
@click.option("--serve-command", metavar="CMD",
              help="Exec CMD BACKEND_PATH ARGS... per device (default: fork `blkpy serve` "
                   "from this process, which has its modules imported already).")
@click.option("--orphan-grace", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Seconds a serve may outlive its removed device before SIGTERM.")
@click.option("--lock-file", metavar="PATH",
              help="Lock that keeps a second daemon off the same xenstore (default: next to "
                   "the xenstored socket).")
@click.option("--serve-arg", "serve_args", multiple=True, metavar="ARG",
              help="Extra argument for every serve (repeatable).")
@click.option("--standby-delay", type=click.FloatRange(0), default=2.0, show_default=True,
              help="Seconds a forked serve runs before its device gets a standby successor "
                   "(forked and ready, it takes over at once when the serve dies).")
@click.option("--no-standby", is_flag=True, help="No standby successors: a serve that dies "
              "is succeeded by a serve forked then.")
def daemon(xenstore_path: str | None, domid: int, platform_name: str, log_dir: str | None,
           serve_command: str | None, orphan_grace: float, lock_file: str | None,
           serve_args: tuple[str, ...], standby_delay: float, no_standby: bool) -> None:
    """Start `blkpy serve` for every new block-blkpy device until SIGTERM."""
    from blkpy.hotplug.watcher import (
        AlreadyRunning,
        DeviceWatcher,
        default_lock_path,
        log_to_stderr,
        take_lock,
    )
    from blkpy.xenstore.client import default_path

    try:
        lock = lock_file or default_lock_path(xenstore_path or default_path())
        take_lock(lock)
    except (AlreadyRunning, ConnectionError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot take the lock {lock}: {exc.strerror}") from None
    log_to_stderr()
    args = ["--platform", platform_name, *(["--xenstore", xenstore_path] if xenstore_path else []),
            *serve_args]
    with connected_xenstore(xenstore_path) as xs:
        watcher = DeviceWatcher(xs, domid=domid,  # type: ignore[arg-type]
                                serve_command=shlex.split(serve_command) if serve_command else None,
                                serve_args=args, log_dir=log_dir, orphan_grace=orphan_grace,
                                standby_delay=None if no_standby else standby_delay)
        status = watcher.run()
    sys.exit(status)
