"""`blkpy hotplug ...`: toolstack integration (the script xl/libxl runs for a blkpy disk)."""

from __future__ import annotations

import click


@click.group()
def hotplug() -> None:
    """Toolstack integration: hotplug script and the device watcher."""
