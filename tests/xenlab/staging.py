"""Per-run artefacts made from the checkout: blkpy's native helper built for dom0, and the
domU initramfs carrying the guest test programs (scripts, and ``lcio`` built for the guest).

Both go into the run directory, which dom0 sees over 9p at /mnt/run. The native helper is
compiled in a chroot of the dom0 root filesystem (same Python and libc as dom0, at host speed)
and cached by the hash of its sources; the initramfs is a cached base archive (busybox,
xen-blkfront, e2fsprogs and util-linux tools with their libraries) plus a small archive of the
checkout's guest scripts (the kernel unpacks concatenated cpio archives in order).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import subprocess
from pathlib import Path

from .images import DOMU_BINARIES, DOMU_MODULES, BuildError, ImageBuilder, Images, _digest, _run

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
GUEST_DIR = HERE / "domU"


def native_sources(repo: Path = REPO) -> list[Path]:
    pkg = repo / "blkpy"
    files = [p for p in pkg.rglob("*") if p.suffix in (".c", ".h") and p.name != "_native.c"]
    return sorted(files + [pkg / "gntdev" / "build_native.py"])


def build_native(builder: ImageBuilder, images: Images, repo: Path = REPO) -> Path:
    """Compile blkpy's cffi helper for dom0; return the .so (cached by source hash)."""
    srcs = native_sources(repo)
    key = _digest(images.root.name, *(p.relative_to(repo).as_posix() for p in srcs),
                  *(p.read_bytes() for p in srcs))
    out_dir = builder.cache / "native" / key
    done = sorted(out_dir.glob("_native*.so"))
    if done:
        return done[0]
    work = images.rootfs / "tmp" / "blkpy-native"
    shutil.rmtree(work, ignore_errors=True)
    for p in srcs:
        dest = work / p.relative_to(repo)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
    for d in {p.parent for p in srcs} | {work / "blkpy"}:
        rel = d.relative_to(work) if d.is_relative_to(work) else d.relative_to(repo)
        (work / rel / "__init__.py").touch()
    _run(["chroot", str(images.rootfs), "sh", "-c",
          "cd /tmp/blkpy-native && python3 blkpy/gntdev/build_native.py"],
         log=builder.logs / "native-build.log")
    built = sorted((work / "blkpy" / "gntdev").glob("_native*.so"))
    if not built:
        raise BuildError("native helper build produced no _native*.so (see logs/native-build.log)")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(built[0], out_dir / built[0].name)
    shutil.rmtree(work, ignore_errors=True)
    return out_dir / built[0].name


#: the lifecycle guest's I/O program (one process per stream, timing its own requests)
LCIO_SOURCE = GUEST_DIR / "lcio.c"


def build_lcio(builder: ImageBuilder, images: Images, source: Path = LCIO_SOURCE) -> Path:
    """Compile the guest's ``lcio`` in a chroot of the dom0 root (cached by source hash).

    Static, because the guest is busybox and carries only the libraries of DOMU_BINARIES;
    the dom0 root has gcc and libc6-dev, whose libc.a a static link needs."""
    code = source.read_bytes()
    out = builder.cache / "lcio" / _digest(images.root.name, code) / "lcio"
    if out.exists():
        return out
    if not (_in_root(images.rootfs, "/usr/lib/x86_64-linux-gnu/libc.a")).exists():
        raise BuildError("the dom0 root has no static libc (libc6-dev's libc.a): "
                         "lcio cannot be linked for the busybox guest")
    work = images.rootfs / "tmp" / "blkpy-lcio"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "lcio.c").write_bytes(code)
    _run(["chroot", str(images.rootfs), "gcc", "-O2", "-Wall", "-static",
          "-o", "/tmp/blkpy-lcio/lcio", "/tmp/blkpy-lcio/lcio.c"],
         log=builder.logs / "lcio-build.log")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "lcio", out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _cpio(src_dir: Path) -> bytes:
    proc = subprocess.run("find . | sort | cpio -o -H newc --quiet", shell=True, cwd=src_dir,
                          capture_output=True, check=True)
    return proc.stdout


def _shared_libs(rootfs: Path, binaries: list[str]) -> list[str]:
    """Library paths (inside rootfs) the binaries load, resolved by the rootfs's own ldd."""
    out = _run(["chroot", str(rootfs), "ldd", *binaries])
    libs: set[str] = set()
    for line in out.splitlines():
        f = line.split()
        if "=>" in f and len(f) > f.index("=>") + 1 and f[f.index("=>") + 1].startswith("/"):
            libs.add(f[f.index("=>") + 1])
        elif f and f[0].startswith("/") and not f[0].endswith(":"):
            libs.add(f[0])  # the dynamic loader
    return sorted(libs)


def _in_root(root: Path, path: str) -> Path:
    """``path`` inside ``root`` with every symlink (absolute ones too) resolved within root."""
    cur = root
    parts = [p for p in path.split("/") if p]
    hops = 0
    while parts:
        nxt = cur / parts.pop(0)
        if nxt.is_symlink():
            hops += 1
            if hops > 40:
                raise BuildError(f"symlink loop resolving {path} in {root}")
            target = os.readlink(nxt)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                cur = root
            continue
        cur = nxt
    return cur


def domu_base_archive(builder: ImageBuilder, images: Images) -> bytes:
    """busybox + xen-blkfront + test tools with their libraries (cached per image set)."""
    cached = images.root / f"domU-base-{_digest(*DOMU_MODULES, *DOMU_BINARIES)}.cpio"
    if cached.exists():
        return cached.read_bytes()
    d = builder.work / "build" / "domU-base"
    shutil.rmtree(d, ignore_errors=True)
    for sub in ("bin", "sbin", "proc", "sys", "dev", "tmp", "mnt", "lib/modules"):
        (d / sub).mkdir(parents=True)
    shutil.copy(builder.busybox(), d / "bin" / "busybox")
    modules = builder.module_files(images, DOMU_MODULES)
    for ko in modules:
        shutil.copy(ko, d / "lib" / "modules" / ko.name)
    (d / "lib" / "modules" / "order").write_text("\n".join(k.name for k in modules) + "\n")
    for path in DOMU_BINARIES + _shared_libs(images.rootfs, DOMU_BINARIES):
        dest = d / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(_in_root(images.rootfs, path), dest)
    # Debian's loader path is /lib64/ld-linux-x86-64.so.2 -> keep the usrmerge layout working
    (d / "usr").mkdir(exist_ok=True)
    os.symlink("../lib", d / "usr" / "lib")
    data = _cpio(d)
    cached.write_bytes(data)
    return data


#: where dom0 keeps the file that the guest's fake qcow2 header names as its backing file
PROBE_BACKING_FILE = "/var/lib/lab/secret.img"


def qcow2_probe_header(backing: str = PROBE_BACKING_FILE, size: int = 16 << 20) -> bytes:
    """Three 64 KiB clusters of a qcow2 v2 image whose L1 table is empty and whose backing
    file is ``backing``: a backend that probed formats would serve the host file's bytes
    for every read. The guest writes this into a disk the operator declared raw."""
    name = backing.encode()
    header = struct.pack(
        ">4sIQIIQIIQQIIQ",
        b"QFI\xfb", 2,  # magic, version
        512, len(name),  # backing file name offset and length
        16, size, 0,  # cluster_bits, virtual size, no encryption
        1, 0x10000,  # l1_size, l1_table_offset (cluster 1, all zero: nothing allocated)
        0x20000, 1,  # refcount table offset and clusters
        0, 0,  # no snapshots
    )
    data = bytearray(3 * 0x10000)
    data[: len(header)] = header
    data[512 : 512 + len(name)] = name
    return bytes(data)


def build_domu_initrd(builder: ImageBuilder, images: Images, dest: Path) -> None:
    """Write the domU initramfs (base archive + the checkout's guest scripts and ``lcio``)
    to ``dest``."""
    base = domu_base_archive(builder, images)
    scripts = builder.work / "build" / "domU-scripts"
    shutil.rmtree(scripts, ignore_errors=True)
    (scripts / "lab").mkdir(parents=True)
    for p in GUEST_DIR.iterdir():
        if p.is_file() and p.suffix != ".c":  # sources: the guest has no compiler
            shutil.copy(p, scripts / "lab" / p.name)
            os.chmod(scripts / "lab" / p.name, 0o755)
    shutil.copy(build_lcio(builder, images), scripts / "lab" / "lcio")
    os.chmod(scripts / "lab" / "lcio", 0o755)
    (scripts / "lab" / "probe-qcow2.bin").write_bytes(qcow2_probe_header())
    os.symlink("lab/init", scripts / "init")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1, mtime=0) as gz:
        gz.write(base + _cpio(scripts))
    dest.write_bytes(buf.getvalue())
