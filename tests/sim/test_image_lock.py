"""One writer per image (blkpy.backends.lock): a guest migrating to the same host gets a
new domain whose serve starts while the old domain's serve still has the image open. The
new serve must reach InitWait at once (libxl waits 10 s for it) and must not read or write
the image until the old one has flushed and closed it."""

import subprocess
import sys
import threading
import time

import pytest

from blkpy.backends.lock import ImageBusy, ImageLock, lock_image
from blkpy.sim import toolstack
from blkpy.sim.frontend import Frontend
from blkpy.sim.host import SimHost
from blkpy.xenbus import XenbusState
from tests.qemu_img import check_clean, needs_qemu, qemu_img

MIB = 1 << 20


def test_one_writer_many_readers(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    with lock_image(str(image), write=True) as writer:
        with pytest.raises(ImageBusy):
            lock_image(str(image), write=True)
        with pytest.raises(ImageBusy):
            lock_image(str(image), write=False)
        # the writer's other descriptors of the file come and go: the lock stays
        open(image, "rb").close()
        with pytest.raises(ImageBusy):
            lock_image(str(image), write=True)
        assert writer.held
    with (lock_image(str(image), write=False), lock_image(str(image), write=False),
          pytest.raises(ImageBusy)):
        lock_image(str(image), write=True)
    with lock_image(str(image), write=True):
        pass


def test_a_killed_holder_leaves_the_image_free(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from blkpy.backends.lock import lock_image\n"
         f"lock = lock_image({str(image)!r}, write=True)\n"
         "print('held', flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        waiter = ImageLock(str(image), write=True)
        assert not waiter.acquire(0.2)
        holder.kill()
        assert waiter.acquire(10)
        waiter.close()
    finally:
        holder.kill()
        holder.wait()


@needs_qemu
def test_the_new_domain_serve_waits_for_the_old_one(tmp_path):
    """xl migrate to localhost, as libxl orders it: the new domain's disk is created while
    the old one is connected; the new frontend connects while the old serve still writes;
    the old domain goes away; only then may the new serve open the qcow2 image."""
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), str(4 * MIB))
    with SimHost() as host:
        old_guest = host.create_guest(1, memory_pages=2048)
        old = toolstack.DiskSpec(1, 51712, "xvda", f"qcow2:{image}")
        host.add_disk(old)
        old_fe = Frontend(old_guest, host.guest_xenstore(1), 51712)
        old_fe.connect(timeout=15)
        assert old_fe.write(0, b"\x11" * 65536).status == 0  # allocates: metadata cached

        new_guest = host.create_guest(2, memory_pages=2048)
        new = toolstack.DiskSpec(2, 51712, "xvda", f"qcow2:{image}")
        start = time.monotonic()
        host.add_disk(new)
        assert host.wait_backend_state(new, XenbusState.INIT_WAIT, 10)
        assert time.monotonic() - start < 10  # libxl's limit for InitWait

        new_fe = Frontend(new_guest, host.guest_xenstore(2), 51712)
        connected = {}
        connecting = threading.Thread(
            target=lambda: connected.setdefault("info", new_fe.connect(timeout=30)))
        connecting.start()
        time.sleep(1.5)
        assert host.backend_state(new) != XenbusState.CONNECTED  # waits for the old serve
        # the old serve is still the only writer, and allocates more clusters
        assert old_fe.write(2048, b"\x22" * 65536).status == 0

        old_fe.close()
        assert host.remove_disk(old)
        connecting.join(30)
        assert "info" in connected, host.backends[-1].log()[-2000:]
        assert "released by its other user" in host.backends[-1].log()
        got = new_fe.read(0, 65536)
        assert got.status == 0 and got.data.tobytes() == b"\x11" * 65536
        got = new_fe.read(2048, 65536)
        assert got.status == 0 and got.data.tobytes() == b"\x22" * 65536
        assert new_fe.write(4096, b"\x33" * 65536).status == 0
        new_fe.close()
        host.remove_disk(new)
        for backend in host.backends:
            backend.wait(10)
    check_clean(str(image))
