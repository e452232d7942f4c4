"""Builds and caches the lab's boot images from Debian packages only.

Everything lands in the cache directory ($BLKPY_XENLAB_CACHE, default ~/.cache/blkpy-xenlab),
never in the checkout. Stages are skipped when their output exists and their inputs (package
list, recipe version, kernel version) are unchanged, so a warm build costs a few seconds.

Two hosts (``--suite``, ``BLKPY_XENLAB_SUITE``): ``bookworm`` (Xen 4.17, the default) and
``trixie`` (Xen 4.20, Debian 13, whose libxl has ``backendtype=tap``). A suite other than the
build host's own comes through a private apt configuration (its own sources list, lists and
cache under the suite's cache directory): the host's apt is never touched.

What the lab boots (facts from running Xen 4.17 and 4.20 under QEMU TCG):
  - ``xen``: the gunzipped hypervisor, which QEMU's multiboot loader takes directly; for a
    suite with ``build_xen``, one built from Debian's source of dom0's Xen tools with shadow
    paging (``build_hypervisor``: live migration of PV guests needs it), cached apart;
  - ``vmlinuz`` for dom0, and ``vmlinux`` (the ELF inside it) for domUs, so that dom0 does not
    spend seconds of emulated CPU on xz decompression at every ``xl create``;
  - ``dom0-initrd.img``: busybox + the virtio/ext4 modules (Debian builds them as modules),
    which mounts the root disk and switches to it;
  - ``dom0.ext4``: a debootstrap'd Debian with the Xen tools, Python and blkpy's dependencies.
The domU initramfs and blkpy's native helper depend on the checkout, so ``prepare_run`` makes
them per run (they are cheap) instead of baking them into the dom0 image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Suite:
    """A Debian release the lab can boot, and the Xen it ships."""

    name: str
    xen: str
    #: dom0 packages this release needs beyond DOM0_PACKAGES
    extra: tuple[str, ...] = ()
    #: boot a hypervisor built from Debian's source of dom0's Xen tools with XEN_BUILD_OPTIONS
    #: (``build_hypervisor``) instead of the packaged one
    build_xen: bool = False


SUITES = {s.name: s for s in (
    Suite("bookworm", "4.17", build_xen=True),
    # cffi compiles through setuptools on Python >= 3.12 (Debian 13 has 3.13). Packaged
    # hypervisor: the mirror this was made on listed the 4.20 source but answered 404 for its
    # files, so its build is untried (tests/xenlab/README.md)
    Suite("trixie", "4.20", ("python3-setuptools",)),
)}
DEFAULT_SUITE = "bookworm"
SUITE_ENV = "BLKPY_XENLAB_SUITE"
# Bump when the recipe below changes in a way the stamps cannot see.
RECIPE_VERSION = "3"
# Bump when the hypervisor build (build_hypervisor) changes in a way its key cannot see.
XEN_BUILD_RECIPE = "1"
#: what the lab's hypervisor sets beyond Debian's own configuration (debian/xen-kconfig, which
#: Debian's build expands with ``make olddefconfig``): a PV guest's log-dirty mode, which live
#: migration needs, is a shadow-paging mode. Debian's 4.17.7 (bookworm-security) and 4.20.4
#: packages were built without it (libxc: "Failed to enable logdirty: 95"); 4.17.5's had it
#: by Kconfig's default, so it is asked for by name, whatever a version's default is
XEN_BUILD_OPTIONS = {"CONFIG_SHADOW_PAGING": "y"}

# Debian packages of the dom0 root filesystem: Xen's toolstack, Python with blkpy's
# dependencies, the tools the dom0 checks use, and a compiler for blkpy's native helper
# (run in a chroot on the host, so the helper matches dom0's Python and libc).
DOM0_PACKAGES = [
    "xen-utils-{xen}", "xenstore-utils",
    "python3", "python3-numpy", "python3-cffi", "python3-ply", "python3-click", "python3-aiofiles",
    "kmod", "procps", "util-linux", "e2fsprogs", "qemu-utils", "psmisc",
    "gcc", "libc6-dev", "python3-dev",
    # NBD disks (phase nbd): blkpy's native helper is compiled against libnbd's header and
    # dlopens the library; the server is qemu-utils' qemu-nbd
    "libnbd0", "libnbd-dev",
]


def dom0_packages(suite: Suite) -> list[str]:
    return [p.format(xen=suite.xen) for p in DOM0_PACKAGES] + list(suite.extra)


def suite_named(name: str | None = None) -> Suite:
    """The suite ``name``, else ``$BLKPY_XENLAB_SUITE``, else the default (bookworm)."""
    name = name or os.environ.get(SUITE_ENV) or DEFAULT_SUITE
    try:
        return SUITES[name]
    except KeyError:
        raise BuildError(f"unknown suite {name!r}; known: {', '.join(SUITES)}") from None

# Modules dom0 loads (the stage-1 initrd loads the first three itself).
DOM0_MODULES = [
    "virtio_pci", "virtio_blk", "ext4", "9pnet_virtio", "9p",
    "xenfs", "xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-privcmd", "xen-blkback", "loop",
]
STAGE1_MODULES = ["virtio_pci", "virtio_blk", "ext4"]
# Binaries the domU test programs need beyond busybox (copied with their libraries).
DOMU_BINARIES = ["/sbin/mkfs.ext4", "/sbin/e2fsck", "/sbin/blkdiscard", "/sbin/blockdev"]

# Modules of the domU initramfs (Debian builds ext4 as a module too).
DOMU_MODULES = ["xen-blkfront", "ext4"]

HOST_TOOLS = {  # command -> Debian package providing it
    "qemu-system-x86_64": "qemu-system-x86",
    "debootstrap": "debootstrap",
    "cpio": "cpio",
    "depmod": "kmod",
    "mkfs.ext4": "e2fsprogs",
    "zstd": "zstd",
    "xz": "xz-utils",
    "apt-get": "apt",
    # the hypervisor build (build_hypervisor; setup.sh installs the same)
    "dpkg-source": "dpkg-dev",
    "make": "make",
    "gcc": "gcc",
    "flex": "flex",
    "bison": "bison",
}

HERE = Path(__file__).resolve().parent


class BuildError(RuntimeError):
    """A build stage failed; the message says which and why."""


def cache_dir() -> Path:
    env = os.environ.get("BLKPY_XENLAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "blkpy-xenlab"


def _log(msg: str) -> None:
    print(f"[xenlab build] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str] | str, *, log: Path | None = None, **kw: object) -> str:
    """Run a command; on failure raise BuildError with the tail of its output."""
    shell = isinstance(cmd, str)
    proc = subprocess.run(cmd, shell=shell, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    out = proc.stdout + proc.stderr
    if log is not None:
        log.write_text(out)
    if proc.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-20:])
        raise BuildError(f"command failed (rc {proc.returncode}): {cmd}\n{tail}")
    return proc.stdout


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def kconfig_with(fragment: str, options: dict[str, str]) -> str:
    """A Kconfig fragment with ``options`` set: any line of the fragment naming one of them
    (set, or ``# CONFIG_X is not set``) is dropped and the wanted value appended."""
    def names(line: str) -> str:
        if line.startswith("# ") and line.endswith(" is not set"):
            return line[2:-len(" is not set")]
        return line.split("=", 1)[0].strip()
    kept = [line for line in fragment.splitlines() if names(line) not in options]
    return "\n".join(kept + [f"{k}={v}" for k, v in options.items()]) + "\n"


def kconfig_value(config: str, name: str) -> str:
    """``y``, ``m``, a value, or ``n`` (``# CONFIG_X is not set`` or absent) in a Kconfig
    file's text."""
    for line in config.splitlines():
        if line.startswith(f"{name}="):
            return line.split("=", 1)[1].strip().strip('"')
    return "n"


def installed_source(status: str, package: str) -> tuple[str, str]:
    """(source package, source version) of an installed package, from dpkg's status file's
    text: ``Source: name (version)`` when the binary's version differs, ``Source: name`` or
    none when it is the binary's own."""
    for stanza in status.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if fields.get("Package") != package or "installed" not in fields.get("Status", ""):
            continue
        source = fields.get("Source", package).split()
        version = source[1].strip("()") if len(source) > 1 else fields["Version"]
        return source[0], version
    raise BuildError(f"{package} is not installed in dom0's root filesystem")


def xen_build_key(version: str, config: str) -> str:
    """The cache key of a built hypervisor: the Debian source version and the configuration
    it was built from."""
    return f"{version}-{_digest(XEN_BUILD_RECIPE, config)}"


def ensure_host_tools() -> None:
    missing = sorted({pkg for cmd, pkg in HOST_TOOLS.items() if shutil.which(cmd) is None})
    if not missing:
        return
    _log(f"installing host packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)
    except BuildError:
        _run(["apt-get", "update", "-q"], env=env)
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)


def debian_mirror() -> str:
    """The mirror this host's apt already uses (deb822 or one-line sources)."""
    if os.environ.get("BLKPY_XENLAB_MIRROR"):
        return os.environ["BLKPY_XENLAB_MIRROR"]
    sources = sorted(Path("/etc/apt").glob("sources.list.d/*.sources"))
    for src in sources:
        for line in src.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    for src in [Path("/etc/apt/sources.list"), *Path("/etc/apt").glob("sources.list.d/*.list")]:
        if src.exists():
            for line in src.read_text().splitlines():
                f = line.split()
                if f and f[0] == "deb" and "security" not in line:
                    return next(x for x in f[1:] if not x.startswith("["))
    return "http://deb.debian.org/debian"


def host_suite() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return ""


class Apt:
    """apt-get/apt-cache for one suite: the host's own configuration for the host's suite,
    else a private one under ``root`` (sources list, lists and cache of its own). With
    ``sources``, always a private one of source packages (``deb-src``), which the host's
    apt need not know."""

    def __init__(self, suite: Suite, root: Path, *, sources: bool = False) -> None:
        self.opts: list[str] = []
        if suite.name == host_suite() and not sources:
            return
        lists, cache = root / "lists", root / "cache"
        for d in (lists / "partial", cache / "archives" / "partial"):
            d.mkdir(parents=True, exist_ok=True)
        sources_list = root / "sources.list"
        sources_list.write_text(f"{'deb-src' if sources else 'deb'} {debian_mirror()} {suite.name} main\n")
        self.opts = ["-o", f"Dir::Etc::sourcelist={sources_list}", "-o", "Dir::Etc::sourceparts=-",
                     "-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={cache}"]
        if not any(p.name != "partial" and p.name != "lock" for p in lists.iterdir()):
            self.update()

    def update(self) -> None:
        _run(["apt-get", *self.opts, "update", "-q"])

    def get(self, *args: str, **kw: object) -> str:
        return _run(["apt-get", *self.opts, *args], **kw)

    def kernel_version(self) -> str:
        """The versioned kernel behind linux-image-amd64 (e.g. 6.1.0-56-amd64)."""
        out = _run(["apt-cache", *self.opts, "depends", "linux-image-amd64"])
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("Depends: linux-image-") and line[len("Depends: linux-image-")].isdigit():
                return line.split("linux-image-", 1)[1]
        raise BuildError("cannot tell the kernel version behind linux-image-amd64 (apt-get update?)")


@dataclasses.dataclass
class Images:
    """Paths of a built image set (all under the cache)."""

    root: Path
    kver: str
    #: the hypervisor the lab built (ImageBuilder.build_hypervisor), booted instead of the
    #: packaged one; its Kconfig file lies beside it as ``xen.config``
    built_xen: Path | None = None

    @property
    def xen(self) -> Path:
        return self.built_xen or self.packaged_xen

    @property
    def packaged_xen(self) -> Path:
        return self.root / "xen"

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def vmlinux(self) -> Path:
        return self.root / "vmlinux"

    @property
    def dom0_initrd(self) -> Path:
        return self.root / "dom0-initrd.img"

    @property
    def dom0_disk(self) -> Path:
        return self.root / "dom0.ext4"

    @property
    def rootfs(self) -> Path:
        return self.root.parent / "rootfs"

    @property
    def modroot(self) -> Path:
        return self.root.parent / "modroot"

    def complete(self) -> bool:
        return all(p.exists() for p in (self.packaged_xen, self.vmlinuz, self.vmlinux,
                                        self.dom0_initrd, self.dom0_disk))


class ImageBuilder:
    def __init__(self, cache: Path | None = None, suite: Suite | None = None) -> None:
        self.cache = cache or cache_dir()  # the lock and the run directories: shared
        self.suite = suite or suite_named()
        # what is built from a suite's packages; the default suite's stays where it always was
        self.work = self.cache if self.suite.name == DEFAULT_SUITE else self.cache / self.suite.name
        self.debs = self.work / "debs"
        self.extracted = self.work / "x"
        self.logs = self.work / "logs"
        for d in (self.debs, self.extracted, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self._apt: Apt | None = None

    @property
    def apt(self) -> Apt:
        if self._apt is None:
            self._apt = Apt(self.suite, self.work / "apt")
        return self._apt

    def stamp(self, msg: str) -> None:
        _log(f"{time.monotonic() - self.t0:5.1f}s {msg}")

    # ---- Debian packages ----
    def package(self, name: str) -> Path:
        """Download (cached) and extract a package; return the extraction dir."""
        debs = sorted(self.debs.glob(f"{name}_*.deb"))
        if not debs:
            try:
                self.apt.get("download", name, cwd=self.debs)
            except BuildError:
                self.apt.update()
                self.apt.get("download", name, cwd=self.debs)
            debs = sorted(self.debs.glob(f"{name}_*.deb"))
        dest = self.extracted / debs[-1].stem
        if not dest.exists():
            tmp = dest.with_suffix(".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            _run(["dpkg", "-x", str(debs[-1]), str(tmp)])
            tmp.rename(dest)
        return dest

    def busybox(self) -> Path:
        pkg = self.package("busybox-static")
        return next(p for p in (pkg / "bin" / "busybox", pkg / "usr" / "bin" / "busybox")
                    if p.exists())  # Debian 13 is usr-merged

    # ---- kernel, Xen, modules ----
    def build(self) -> Images:
        images = self._images()
        if self.suite.build_xen:
            images.built_xen = self.build_hypervisor(images.rootfs)
        return images

    def _images(self) -> Images:
        ensure_host_tools()
        kver = self.apt.kernel_version()
        key = _digest(RECIPE_VERSION, kver, " ".join(dom0_packages(self.suite)), " ".join(DOM0_MODULES),
                      (HERE / "dom0" / "lab-init").read_bytes(),
                      (HERE / "dom0" / "stage1-init").read_bytes())
        images = Images(self.work / "images" / key, kver)
        if images.complete():
            self.stamp(f"images up to date ({images.root})")
            return images
        images.root.mkdir(parents=True, exist_ok=True)
        xen_pkg = self.package(f"xen-hypervisor-{self.suite.xen}-amd64")
        linux_pkg = self.package(f"linux-image-{kver}")
        busybox = self.busybox()
        self.stamp("packages ready")

        gz = next((xen_pkg / "boot").glob(f"xen-{self.suite.xen}*-amd64.gz"))
        _run(f"zcat '{gz}' > '{images.packaged_xen}.tmp' && mv '{images.packaged_xen}.tmp' '{images.packaged_xen}'")
        shutil.copy(linux_pkg / "boot" / f"vmlinuz-{kver}", images.vmlinuz)
        self._extract_vmlinux(images.vmlinuz, images.vmlinux)
        self._module_tree(linux_pkg, images)
        self._stage1_initrd(images, busybox)
        self.stamp("xen, kernels, stage-1 initrd ready")
        self._rootfs(images)
        self._dom0_disk(images)
        self.stamp(f"images ready in {images.root}")
        return images

    # ---- the hypervisor, built from Debian's source ----
    def build_hypervisor(self, rootfs: Path) -> Path:
        """Xen built from Debian's source of the version of dom0's Xen tools (so the
        hypervisor/tools interfaces are that one version's), with Debian's patches and
        configuration plus XEN_BUILD_OPTIONS; cached by that version and configuration, so
        only a new version or recipe builds again. Returns the ``xen`` file QEMU boots."""
        status = (rootfs / "var" / "lib" / "dpkg" / "status").read_text()
        source, version = installed_source(status, f"xen-utils-{self.suite.xen}")
        srcdir = self.work / "xen-src"
        dsc = srcdir / f"{source}_{version.split(':')[-1]}.dsc"  # file names have no epoch
        if not dsc.exists():
            self._download_source(source, version, srcdir)
        config = kconfig_with(self._debian_kconfig(dsc), XEN_BUILD_OPTIONS)
        out = self.work / "xen-build" / xen_build_key(version, config)
        if (out / "xen").exists():
            self.stamp(f"hypervisor up to date ({out})")
            return out / "xen"
        self.stamp(f"building the hypervisor of {source} {version} (a few minutes, once)")
        tree = self.work / "build" / "xen-source"
        shutil.rmtree(tree, ignore_errors=True)
        _run(["dpkg-source", "--no-check", "-x", str(dsc), str(tree)])  # applies Debian's patches
        (tree / "xen" / ".config").write_text(config)
        # Debian's rules clear the compiler flags dpkg exports: they are for the tools, not Xen
        env = {k: v for k, v in os.environ.items()
               if k not in ("CFLAGS", "CPPFLAGS", "CXXFLAGS", "LDFLAGS", "MAKEFLAGS")}
        make = ["make", "-C", str(tree / "xen"), "XEN_TARGET_ARCH=x86_64",
                # the boot banner's version (a patch of Debian's prints it)
                f"DEB_VERSION={version} + " + " ".join(f"{k}={v}" for k, v in XEN_BUILD_OPTIONS.items())]
        _run([*make, "olddefconfig"], env=env, log=self.logs / "xen-olddefconfig.log")
        final = (tree / "xen" / ".config").read_text()
        refused = {k: kconfig_value(final, k) for k, v in XEN_BUILD_OPTIONS.items()
                   if kconfig_value(final, k) != v}
        if refused:  # Kconfig drops what a dependency forbids: say so rather than boot it
            raise BuildError(f"Xen {version}'s Kconfig did not keep {XEN_BUILD_OPTIONS}: got {refused}")
        t0 = time.monotonic()
        _run([*make, f"-j{os.cpu_count() or 1}"], env=env, log=self.logs / "xen-build.log")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copy(tree / "xen" / "xen", tmp / "xen")
        (tmp / "xen.config").write_text(final)
        tmp.rename(out)
        shutil.rmtree(tree)
        for orig in tree.parent.glob(f"{source}_*.orig.tar.*"):  # dpkg-source's copy
            orig.unlink()
        self.stamp(f"hypervisor built in {time.monotonic() - t0:.0f}s ({out})")
        return out / "xen"

    def _download_source(self, source: str, version: str, srcdir: Path) -> None:
        """The .dsc and tarballs of one source version, from the suite's own deb-src list
        (a private apt configuration: the host's apt is never asked or changed)."""
        self.stamp(f"downloading the source of {source} {version}")
        apt = Apt(self.suite, self.work / "apt-src", sources=True)
        tmp = srcdir.with_name(srcdir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            apt.get("source", "--download-only", f"{source}={version}", cwd=tmp)
        except BuildError:
            apt.update()  # the lists may predate this version
            apt.get("source", "--download-only", f"{source}={version}", cwd=tmp)
        srcdir.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".dsc"):  # the .dsc last
            os.replace(f, srcdir / f.name)
        tmp.rmdir()

    @staticmethod
    def _debian_kconfig(dsc: Path) -> str:
        """debian/xen-kconfig, Debian's configuration of the hypervisor (its build copies it
        to xen/.config and runs ``make olddefconfig``), read from the debian tarball."""
        stem = dsc.name[:-len(".dsc")]
        tarballs = sorted(dsc.parent.glob(f"{stem}.debian.tar.*"))
        if not tarballs:
            raise BuildError(f"{dsc}: no debian tarball beside it")
        with tarfile.open(tarballs[-1]) as tar:
            try:
                member = tar.extractfile("debian/xen-kconfig")
            except KeyError:
                member = None
            if member is None:
                raise BuildError(f"{tarballs[-1]}: no debian/xen-kconfig")
            return member.read().decode()

    @staticmethod
    def _extract_vmlinux(vmlinuz: Path, out: Path) -> None:
        data = vmlinuz.read_bytes()
        xz, zst = data.find(b"\xfd7zXZ\x00"), data.find(b"\x28\xb5\x2f\xfd")
        if xz >= 0:  # Debian 12
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[xz:])
        elif zst >= 0:  # Debian 13; zstd stops at the end of the frame, ignoring what follows
            elf = subprocess.run(["zstd", "-q", "-d", "-c"], input=data[zst:],
                                 capture_output=True).stdout
        else:
            raise BuildError(f"{vmlinuz}: no xz or zstd payload found")
        if elf[:4] != b"\x7fELF":
            raise BuildError(f"{vmlinuz}: payload is not an ELF kernel")
        out.write_bytes(elf)

    def _module_tree(self, linux_pkg: Path, images: Images) -> None:
        """All modules with modules.dep (the package has none: depmod runs in its postinst)."""
        dep = images.modroot / "lib" / "modules" / images.kver / "modules.dep"
        if dep.exists():
            return
        shutil.rmtree(images.modroot, ignore_errors=True)
        (images.modroot / "lib" / "modules").mkdir(parents=True)
        src = next(p for p in (linux_pkg / "lib" / "modules" / images.kver,
                               linux_pkg / "usr" / "lib" / "modules" / images.kver) if p.is_dir())
        shutil.copytree(src, images.modroot / "lib" / "modules" / images.kver, symlinks=True)
        # Debian 13 ships modules xz-compressed; busybox insmod (stage 1, guests) loads plain ones
        _run(["find", str(images.modroot / "lib" / "modules"), "-name", "*.ko.xz",
              "-exec", "xz", "-d", "{}", "+"])
        _run(["depmod", "-b", str(images.modroot), images.kver])

    def module_files(self, images: Images, names: list[str]) -> list[Path]:
        """The .ko files (in load order, deduplicated) needed for ``names``."""
        seen: dict[str, None] = {}
        for name in names:
            out = _run(["modprobe", "-d", str(images.modroot), "-S", images.kver,
                        "--show-depends", name])
            for line in out.splitlines():
                f = line.split()
                if f and f[0] == "insmod":
                    seen.setdefault(f[1], None)
        return [Path(p) for p in seen]

    def _stage1_initrd(self, images: Images, busybox: Path) -> None:
        d = self.work / "build" / "dom0-initrd"
        shutil.rmtree(d, ignore_errors=True)
        for sub in ("bin", "proc", "sys", "dev", "newroot", "mods"):
            (d / sub).mkdir(parents=True)
        shutil.copy(busybox, d / "bin" / "busybox")
        shutil.copy(HERE / "dom0" / "stage1-init", d / "init")
        os.chmod(d / "init", 0o755)
        order = []
        for ko in self.module_files(images, STAGE1_MODULES):
            shutil.copy(ko, d / "mods" / ko.name)
            order.append(ko.name)
        (d / "modules.order").write_text("\n".join(order) + "\n")
        # uncompressed: inflating under TCG costs more than loading the bytes
        _run(f"cd '{d}' && find . | cpio -o -H newc --quiet > '{images.dom0_initrd}.tmp'")
        os.replace(f"{images.dom0_initrd}.tmp", images.dom0_initrd)

    # ---- dom0 root filesystem ----
    def _rootfs(self, images: Images) -> None:
        rootfs = images.rootfs
        want = _digest(self.suite.name, " ".join(dom0_packages(self.suite)))
        stamp = rootfs / ".blkpy-xenlab-packages"
        if not (stamp.exists() and stamp.read_text() == want):
            tmp = rootfs.with_name("rootfs.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.stamp("debootstrap (a few minutes on a cold cache)")
            _run(["debootstrap", "--variant=minbase", "--include=" + ",".join(dom0_packages(self.suite)),
                  self.suite.name, str(tmp), debian_mirror()], log=self.logs / "debootstrap.log")
            _run(["chroot", str(tmp), "apt-get", "clean"])
            (tmp / ".blkpy-xenlab-packages").write_text(want)
            shutil.rmtree(rootfs, ignore_errors=True)
            tmp.rename(rootfs)
            self.stamp("debootstrap done")
        # only the modules dom0 loads: the full tree would double the image (and mkfs time)
        moddir = rootfs / "lib" / "modules"
        shutil.rmtree(moddir, ignore_errors=True)
        kdir = moddir / images.kver
        src = images.modroot / "lib" / "modules" / images.kver
        for ko in self.module_files(images, DOM0_MODULES):
            dest = kdir / ko.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ko, dest)
        for f in src.glob("modules.builtin*"):
            shutil.copy(f, kdir / f.name)
        shutil.copy(src / "modules.order", kdir / "modules.order")
        _run(["depmod", "-b", str(rootfs), images.kver])
        shutil.copy(HERE / "dom0" / "lab-init", rootfs / "sbin" / "blkpy-lab-init")
        os.chmod(rootfs / "sbin" / "blkpy-lab-init", 0o755)
        (rootfs / "etc" / "hostname").write_text("dom0\n")
        (rootfs / "etc" / "fstab").write_text("/dev/vda / ext4 rw 0 1\n")
        for d in ("mnt/src", "mnt/run", "var/lib/lab", "usr/lib/blkpy-lab"):
            (rootfs / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(images.vmlinux, rootfs / "usr" / "lib" / "blkpy-lab" / "vmlinux")

    def _dom0_disk(self, images: Images) -> None:
        size_mb = int(_run(["du", "-sm", str(images.rootfs)]).split()[0]) + 384
        tmp = f"{images.dom0_disk}.tmp"
        _run(["mkfs.ext4", "-q", "-F", "-L", "dom0root", "-E", "lazy_itable_init=0",
              "-d", str(images.rootfs), tmp, f"{size_mb}M"])
        os.replace(tmp, images.dom0_disk)
