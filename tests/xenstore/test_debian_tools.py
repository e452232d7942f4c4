"""Debian's xenstore-utils (libxenstore clients) against `blkpy sim xenstored`.

They find the daemon through XENSTORED_PATH; every test checks data crossing between a
tool and blkpy's own client, so a tool talking to some other daemon would fail."""

import os
import shutil
import subprocess

import pytest

from blkpy.xenstore.client import NoEntry, XenstoreClient, XenstoreError

pytestmark = pytest.mark.skipif(
    shutil.which("xenstore-read") is None, reason="xenstore-utils is not installed (setup.sh)"
)


@pytest.fixture
def tool(xenstored):
    env = {**os.environ, "XENSTORED_PATH": xenstored}

    def run(*args, check=True):
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=20)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    return run


def test_tools_use_xenstored_path(tool, socket_dir):
    env = {**os.environ, "XENSTORED_PATH": os.path.join(socket_dir, "nobody-here")}
    result = subprocess.run(["xenstore-read", "/"], env=env, capture_output=True, timeout=20)
    assert result.returncode != 0


def test_write_then_read_both_ways(tool, client, base):
    tool("xenstore-write", f"{base}/from-tool", "hello", f"{base}/second", "two")
    assert client.read(f"{base}/from-tool") == b"hello"
    assert client.read(f"{base}/second") == b"two"
    client.write(f"{base}/from-client", "world")
    assert tool("xenstore-read", f"{base}/from-client").stdout == "world\n"
    assert tool("xenstore-read", f"{base}/missing", check=False).returncode != 0


def test_exists(tool, client, base):
    client.write(base, "")
    assert tool("xenstore-exists", base, check=False).returncode == 0
    assert tool("xenstore-exists", f"{base}/missing", check=False).returncode != 0


def test_list_and_ls(tool, client, base):
    client.write(f"{base}/a", "1")
    client.write(f"{base}/b/c", "deep")
    assert tool("xenstore-list", base).stdout.split() == ["a", "b"]
    assert tool("xenstore-ls", base).stdout.splitlines() == ['a = "1"', 'b = ""', ' c = "deep"']
    client.set_perms(f"{base}/a", ["n0", "r5"])
    listing = tool("xenstore-ls", "-p", base).stdout.splitlines()
    assert listing[0].startswith('a = "1"') and listing[0].endswith("(n0,r5)")


def test_ls_of_a_large_directory(tool, client, base):
    names = [f"long-name-for-a-child-node-{i:04d}" for i in range(200)]  # > 4096 bytes
    tx = client.start_transaction()
    for name in names:
        client.mkdir(f"{base}/{name}", tx)
    assert client.end_transaction(tx)
    assert tool("xenstore-list", base).stdout.split() == names


def test_rm(tool, client, base):
    client.write(f"{base}/tree/leaf", "x")
    tool("xenstore-rm", f"{base}/tree")
    with pytest.raises(NoEntry):
        client.read(f"{base}/tree/leaf")


def test_chmod(tool, client, base):
    client.write(f"{base}/node", "x")
    tool("xenstore-chmod", f"{base}/node", "n0", "r7", "b9")
    assert client.get_perms(f"{base}/node") == ["n0", "r7", "b9"]


def test_watch(tool, xenstored, client, base):
    env = {**os.environ, "XENSTORED_PATH": xenstored}
    watcher = subprocess.Popen(
        ["xenstore-watch", "-n", "2", base], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert watcher.stdout.readline().strip() == base  # the initial fire
        client.write(f"{base}/changed", "1")
        assert watcher.wait(20) == 0
        assert watcher.stdout.read().strip() == f"{base}/changed"
    finally:
        watcher.kill()
        watcher.wait()


def test_relative_paths_are_under_dom0_home(tool, client):
    tool("xenstore-write", "blkpy-relative-test", "rel")
    assert client.read("/local/domain/0/blkpy-relative-test") == b"rel"


def test_tools_respect_guest_permissions(tool, xenstored, client, base):
    client.write(f"{base}/secret", "s")
    with XenstoreClient.connect(xenstored, domid=4) as guest, pytest.raises(XenstoreError) as info:
        guest.read(f"{base}/secret")
    assert info.value.errno_name == "EACCES"
    assert tool("xenstore-read", f"{base}/secret").stdout == "s\n"  # tools are dom0
