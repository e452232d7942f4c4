"""blkpy's command line (click)."""

from __future__ import annotations

import click

from blkpy import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="blkpy")
def main() -> None:
    """blkpy: a user-space Xen block backend."""


if __name__ == "__main__":
    main()
