"""`blkpy image ...`: create, info, check, convert (same words and exit codes as qemu-img)."""

from __future__ import annotations

import click


@click.group()
def image() -> None:
    """Create, inspect, check and convert disk images."""
