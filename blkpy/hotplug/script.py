"""Installing the hotplug script into the Xen scripts directory."""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import sys
from importlib import resources
from pathlib import Path

from blkpy.hotplug import SCRIPT_NAME


def blkpy_command() -> str:
    """How the script should start blkpy: the `blkpy` found on PATH now (libxl's PATH may
    differ from the operator's), else this interpreter running the package."""
    found = shutil.which("blkpy")
    if found:
        return shlex.quote(os.path.abspath(found))
    return f"{shlex.quote(sys.executable)} -m blkpy"


def script_text(command: str | None = None) -> str:
    text = resources.files("blkpy.hotplug").joinpath(SCRIPT_NAME).read_text()
    return text.replace("@BLKPY@", command or blkpy_command())


def install_script(directory: str | os.PathLike[str], command: str | None = None) -> Path:
    """Write the script into ``directory`` (mode 0755, atomically); return its path."""
    dest_dir = Path(directory)
    if not dest_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(dest_dir))
    dest = dest_dir / SCRIPT_NAME
    tmp = dest_dir / f".{SCRIPT_NAME}.tmp"
    tmp.write_text(script_text(command))
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)
    return dest
