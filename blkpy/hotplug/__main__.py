"""`python -m blkpy.hotplug add|remove PATH`: what the hotplug script runs (the `blkpy
hotplug` commands without importing the rest of blkpy's command line)."""

from blkpy.hotplug.cli import hotplug

hotplug(prog_name="blkpy hotplug")
