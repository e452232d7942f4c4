"""Toolstack integration: the hotplug script libxl runs for a blkpy disk, what it does
(``device``), and the watcher that starts ``blkpy serve`` for new devices (``watcher``).

xl hands blkpy a disk as ``backendtype=phy,script=block-blkpy`` with the kernel's
xen-blkback not loaded: libxl writes backend/vbd/<domid>/<devid> and waits for the backend's
InitWait *before* it runs the script, so the watcher must already be running.
"""

from __future__ import annotations

SCRIPT_NAME = "block-blkpy"
DEFAULT_SCRIPTS_DIR = "/etc/xen/scripts"
