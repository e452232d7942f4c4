"""blkpy: a user-space Xen block backend."""

__version__ = "0.1.0"
