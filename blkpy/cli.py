"""blkpy's command line (click)."""

from __future__ import annotations

import click

from blkpy import __version__
from blkpy.hotplug_cli import hotplug
from blkpy.image_cli import image


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="blkpy")
def main() -> None:
    """blkpy: a user-space Xen block backend."""


@main.group()
def sim() -> None:
    """The simulated Xen host (xenstored, guests) for tests and demos."""


@sim.command("xenstored")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False),
              help="Unix socket to listen on (clients find it through XENSTORED_PATH).")
def sim_xenstored(socket_path: str) -> None:
    """Run a simulated xenstored in the foreground until SIGTERM/SIGINT."""
    from blkpy.xenstore.server import run_xenstored

    run_xenstored(socket_path)


main.add_command(image)
main.add_command(hotplug)

if __name__ == "__main__":
    main()
