"""A temporary simulated xenstored for test fixtures (shared by several test packages)."""

import contextlib
import os
import shutil
import tempfile

from blkpy.xenstore.server import running_xenstored


@contextlib.contextmanager
def temporary_xenstored(prefix: str = "blkpy-xs-"):
    """A `blkpy sim xenstored` subprocess on a socket in a short temporary directory
    (AF_UNIX socket paths are limited to 107 bytes); yields the socket path."""
    tmpdir = tempfile.mkdtemp(prefix=prefix)
    path = os.path.join(tmpdir, "socket")
    try:
        with running_xenstored(path):
            yield path
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
