"""`python -m blkpy` runs the command line (used to start serve subprocesses)."""

from blkpy.cli import main

main()
