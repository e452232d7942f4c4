"""Installing the hotplug script into the Xen scripts directory."""

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


def install_script(directory: str | os.PathLike[str], python: str | None = None) -> Path:
    """Write the script into ``directory`` (mode 0755, atomically); return its path."""
    dest_dir = Path(directory)
    if not dest_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(dest_dir))
    dest = dest_dir / SCRIPT_NAME
    tmp = dest_dir / f".{SCRIPT_NAME}.tmp"
    tmp.write_text(script_text(python))
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)
    return dest
