"""cffi build script for blkpy.gntdev._native (compiled from gntdev.c at install time)."""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
# The C declarations exposed to Python live in gntdev.h between the CDEF markers so
# the header stays the single source of truth for both the compiler and cffi.
_header = (HERE / "gntdev.h").read_text()
_cdef = _header.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]
ffibuilder.cdef(_cdef)
ffibuilder.set_source(
    "blkpy.gntdev._native",
    '#include "gntdev.h"\n' + (HERE / "gntdev.c").read_text(),
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
