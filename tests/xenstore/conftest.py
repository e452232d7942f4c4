"""Fixtures: a simulated xenstored started through the CLI, clients, unique test paths."""

import re
import shutil
import tempfile

import pytest
from xenstored_fixture import temporary_xenstored

from blkpy.xenstore.client import XenstoreClient


@pytest.fixture
def socket_dir():
    # Short paths: AF_UNIX socket paths are limited to 107 bytes.
    path = tempfile.mkdtemp(prefix="blkpy-xs-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def xenstored():
    """The socket path of a `blkpy sim xenstored` subprocess shared by a test module."""
    with temporary_xenstored() as path:
        yield path


@pytest.fixture
def client(xenstored):
    with XenstoreClient.connect(xenstored) as c:
        yield c


@pytest.fixture
def base(request):
    """A xenstore path no other test of the module uses."""
    return "/test/" + re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)
