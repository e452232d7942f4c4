"""cffi build script for blkpy.gntdev._native (compiled from gntdev.c at install time)."""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
# Each C unit has a header whose declarations between the CDEF markers are what Python
# sees, so the header stays the single source of truth for both the compiler and cffi.
# gntdev.c: device ioctls, barriers, batched I/O; uring.c: the io_uring engine; ringloop.c: the
# ring loop's common case without the interpreter; simfront.c: the simulated frontend's
# request generator (so the load generator is never the bottleneck of a benchmark);
# diskq.c: network disks' queues, which the ring loop drives, over nbdio.c (libnbd) and
# rbdio.c (librbd); heap.c: the heap faulted in ahead of a takeover.
BACKENDS = HERE.parent / "backends"
UNITS = [HERE / "gntdev", HERE / "uring", HERE / "ringloop", HERE.parent / "sim" / "simfront",
         BACKENDS / "diskq", BACKENDS / "nbdio", BACKENDS / "rbdio", HERE / "heap"]


def _cdef(header: Path) -> str:
    text = header.read_text()
    return text.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]


ffibuilder.cdef("\n".join(_cdef(u.with_suffix(".h")) for u in UNITS if u.with_suffix(".h").exists()))
ffibuilder.set_source(
    "blkpy.gntdev._native",
    "\n".join(
        f'#include "{u.name}.h"\n' + u.with_suffix(".c").read_text()
        for u in UNITS
        if u.with_suffix(".c").exists()
    ),
    include_dirs=[str(u.parent) for u in UNITS],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
