"""The part of librados/librbd's C API the rbd backend uses, bound in cffi's ABI mode
(``ffi.dlopen``) on first use.

Why ABI mode rather than a compiled extension: nothing to build at install (blkpy installs
and its main native module loads on machines without Ceph), no build-time dependency on
``librbd-dev``, and the rbd target fails with one clear line where ``librbd1`` is missing.
These are the control calls and the synchronous data calls (image tools, the sync and
thread engines), so a libffi call (~1 µs) is nothing next to a network round trip; the
asynchronous data path is C (``blkpy/backends/rbdio.c``, which looks librbd up itself).
The declarations below are checked against Debian's ``<rbd/librbd.h>`` by a test that
compiles them (API mode) where the header is installed (tests/backends/test_rbd.py).
Prototypes are librbd 1.16 (Ceph 16, "pacific"); every one used here exists since librbd
1.12 or earlier, except ``rbd_write_zeroes`` (1.16).
"""

from __future__ import annotations

import functools
import os

from cffi import FFI

from blkpy.backends.base import DiskError

CDEF = """
typedef void *rados_t;
typedef void *rados_ioctx_t;
typedef void *rbd_image_t;
typedef enum { RBD_LOCK_MODE_EXCLUSIVE = 0, RBD_LOCK_MODE_SHARED = 1 } rbd_lock_mode_t;

int rados_create2(rados_t *pcluster, const char *const clustername,
                  const char *const name, uint64_t flags);
int rados_conf_read_file(rados_t cluster, const char *path);
int rados_conf_set(rados_t cluster, const char *option, const char *value);
int rados_connect(rados_t cluster);
void rados_shutdown(rados_t cluster);
int rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx);
void rados_ioctx_destroy(rados_ioctx_t io);
void rados_ioctx_set_namespace(rados_ioctx_t io, const char *nspace);

int rbd_open(rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name);
int rbd_open_read_only(rados_ioctx_t io, const char *name, rbd_image_t *image,
                       const char *snap_name);
int rbd_close(rbd_image_t image);
int rbd_get_size(rbd_image_t image, uint64_t *size);
int rbd_get_features(rbd_image_t image, uint64_t *features);
int rbd_is_exclusive_lock_owner(rbd_image_t image, int *is_owner);
int rbd_lock_acquire(rbd_image_t image, rbd_lock_mode_t lock_mode);

ssize_t rbd_read2(rbd_image_t image, uint64_t ofs, size_t len, char *buf, int op_flags);
ssize_t rbd_write2(rbd_image_t image, uint64_t ofs, size_t len, const char *buf,
                   int op_flags);
int rbd_flush(rbd_image_t image);
ssize_t rbd_write_zeroes(rbd_image_t image, uint64_t ofs, size_t len, int zero_flags,
                         int op_flags);
"""

#: rbd_get_features bit (features.h: RBD_FEATURE_EXCLUSIVE_LOCK)
FEATURE_EXCLUSIVE_LOCK = 1 << 2
#: sonames of Debian's librbd1/librados2 (the packages ceph-common depends on)
LIBRBD = "librbd.so.1"
LIBRADOS = "librados.so.2"

ffi = FFI()
ffi.cdef(CDEF)


class Libs:
    """The two libraries, as cffi lib objects."""

    def __init__(self, rados: object, rbd: object) -> None:
        self.rados = rados
        self.rbd = rbd


@functools.cache
def _load() -> Libs | str:
    try:
        # librbd's symbols are found through the handle of librbd; librados's through
        # its own (dlsym on one handle does not promise the other's exports)
        return Libs(ffi.dlopen(LIBRADOS), ffi.dlopen(LIBRBD))
    except OSError as exc:
        return f"{exc}".splitlines()[0]


def load() -> Libs:
    """The bound libraries; DiskError (one line) where librbd is not installed."""
    libs = _load()
    if isinstance(libs, str):
        raise DiskError(f"rbd: cannot load {LIBRBD} (install Debian's librbd1 or "
                        f"ceph-common): {libs}")
    return libs


def strerror(ret: int) -> str:
    """librados/librbd return -errno."""
    return os.strerror(-ret) if ret < 0 else f"status {ret}"
