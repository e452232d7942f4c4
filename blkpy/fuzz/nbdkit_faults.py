"""An nbdkit plugin (run by nbdkit's embedded Python, not imported by blkpy): a file whose
I/O fails with EIO where a control file says, so `blkpy fuzz crashes` can fail the storage
under a real backend.

    nbdkit python nbdkit_faults.py file=IMAGE control=FAULTS.json

FAULTS.json is ``{"every": bool, "writes": bool, "ranges": [[start, end], ...]}``: with
``every`` each read, write, trim, zero and flush fails; with ``writes`` each write, trim
and zero; otherwise the reads, writes, trims and zeroes touching a range do.
The campaign replaces the file atomically; the plugin rereads it whenever it changes."""

import builtins
import errno
import json
import os

import nbdkit  # provided by nbdkit's python plugin

API_VERSION = 2

_config = {"file": "", "control": ""}
_faults = {"key": None, "every": False, "writes": False, "ranges": []}


def config(key, value):
    if key not in _config:
        raise RuntimeError(f"unknown parameter {key}")
    _config[key] = value


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):  # noqa: A001 - nbdkit's callback name
    return os.open(_config["file"], os.O_RDONLY if readonly else os.O_RDWR)


def close(fd):
    os.close(fd)


def get_size(fd):
    return os.fstat(fd).st_size


def _fail_if_faulty(offset, count, write=False):
    """EIO if the request touches a failing range (count None: a flush, which fails only
    when everything does)."""
    st = os.stat(_config["control"])
    key = (st.st_ino, st.st_mtime_ns)
    if key != _faults["key"]:
        with builtins.open(_config["control"]) as f:
            spec = json.load(f)
        _faults.update(key=key, every=spec["every"], writes=spec["writes"],
                       ranges=spec["ranges"])
    if _faults["every"] or (write and _faults["writes"]) or count is not None and any(
            offset < end and start < offset + count for start, end in _faults["ranges"]):
        nbdkit.set_error(errno.EIO)
        raise OSError(errno.EIO, "injected fault")


def pread(fd, buf, offset, flags):
    _fail_if_faulty(offset, len(buf))
    buf[:] = os.pread(fd, len(buf), offset).ljust(len(buf), b"\0")


def pwrite(fd, buf, offset, flags):
    _fail_if_faulty(offset, len(buf), write=True)
    os.pwrite(fd, buf, offset)


def zero(fd, count, offset, flags):
    _fail_if_faulty(offset, count, write=True)
    os.pwrite(fd, bytes(count), offset)


def trim(fd, count, offset, flags):
    zero(fd, count, offset, flags)


def flush(fd, flags):
    _fail_if_faulty(0, None)
    os.fdatasync(fd)


def can_write(fd):
    return True


def can_flush(fd):
    return True


def can_trim(fd):
    return True


def can_zero(fd):
    return True


def can_multi_conn(fd):
    return True
