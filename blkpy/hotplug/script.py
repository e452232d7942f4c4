"""Installing the hotplug script into the Xen scripts directory, and the systemd unit
that runs the device watcher (`blkpy hotplug daemon`)."""

from __future__ import annotations

import errno
import os
import sys
from importlib import resources
from pathlib import Path

import blkpy
from blkpy.hotplug import SCRIPT_NAME


def blkpy_home() -> str:
    """The directory that holds the blkpy package (put on PYTHONPATH by the script, since
    libxl runs it with the toolstack's environment, not the operator's)."""
    return str(Path(blkpy.__file__).resolve().parent.parent)


def script_text(python: str | None = None) -> str:
    text = resources.files("blkpy.hotplug").joinpath(SCRIPT_NAME).read_text()
    return (text.replace("@PYTHON@", python or sys.executable)
            .replace("@BLKPY_HOME@", blkpy_home()))


UNIT_NAME = "blkpy-hotplug.service"
DEFAULT_SYSTEMD_DIR = "/etc/systemd/system"


def unit_text(python: str | None = None) -> str:
    """The watcher's unit. It must run before any guest starts (libxl waits for InitWait
    before it runs the hotplug script) and after xenstored. KillMode=process: stopping
    or restarting the watcher leaves the serves, i.e. the guests' disks, running; a new
    watcher takes over the devices they serve. Serves log to the journal through the
    watcher's stderr, each line naming its device (vbd-<domid>-<devid>)."""
    python = python or sys.executable
    return f"""[Unit]
Description=blkpy block backends: start `blkpy serve` for every block-blkpy disk
Documentation=man:xl-disk-configuration(5)
After=proc-xen.mount xenstored.service
Requires=proc-xen.mount
Before=xendomains.service xen-watchdog.service
ConditionPathExists=/proc/xen/capabilities

[Service]
Type=simple
Environment=PYTHONPATH={blkpy_home()}
ExecStart={python} -m blkpy hotplug daemon
KillMode=process
Restart=on-failure
RestartSec=1
SyslogIdentifier=blkpy

[Install]
WantedBy=multi-user.target
"""


def _write_atomically(dest: Path, text: str, mode: int) -> Path:
    if not dest.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(dest.parent))
    tmp = dest.parent / f".{dest.name}.tmp"
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, dest)
    return dest


def install_script(directory: str | os.PathLike[str], python: str | None = None) -> Path:
    """Write the script into ``directory`` (mode 0755, atomically); return its path."""
    return _write_atomically(Path(directory) / SCRIPT_NAME, script_text(python), 0o755)


def install_unit(directory: str | os.PathLike[str], python: str | None = None) -> Path:
    """Write the watcher's systemd unit into ``directory`` (mode 0644, atomically)."""
    return _write_atomically(Path(directory) / UNIT_NAME, unit_text(python), 0o644)
