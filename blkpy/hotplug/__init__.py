"""Toolstack integration: the hotplug script libxl runs for a blkpy disk, what it does
(``device``), and the watcher that starts ``blkpy serve`` for new devices (``watcher``).

xl hands blkpy a disk as ``backendtype=phy,script=block-blkpy`` with the kernel's
xen-blkback not loaded: libxl writes backend/vbd/<domid>/<devid> and waits for the backend's
InitWait *before* it runs the script, so the watcher must already be running.
"""

from __future__ import annotations

SCRIPT_NAME = "block-blkpy"
#: backend directories blkpy serves: vbd (phy disks, xen-blkback unloaded) and vbd3
#: (backendtype=tap since Xen 4.19, which xen-blkback ignores: the two run side by side)
BACKEND_KINDS = ("vbd", "vbd3")
DEFAULT_SCRIPTS_DIR = "/etc/xen/scripts"


def untap(params: str) -> str:
    """The operator's target inside ``params`` as libxl writes it. For backendtype=tap
    (vbd3, Xen >= 4.19) libxl writes ``<fmt>:<target>`` with ``aio`` for its raw format
    (the only one `tap` accepts besides vhd), so ``format=raw,target=qcow2:/x.qcow2``
    arrives as ``aio:qcow2:/x.qcow2``; for phy (vbd) the target comes verbatim."""
    head, sep, rest = params.partition(":")
    return rest if sep and head == "aio" and rest else params
