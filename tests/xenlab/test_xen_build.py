"""The lab's own hypervisor build (images.ImageBuilder.build_hypervisor): which source
version, which configuration, which cache entry, which file QEMU boots. Pure logic, no
download or compiler (runs in the normal suite)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from .boot import qemu_command
from .images import (
    SUITES,
    XEN_BUILD_OPTIONS,
    BuildError,
    ImageBuilder,
    Images,
    installed_source,
    kconfig_value,
    kconfig_with,
    xen_build_key,
)

# the shape of Debian's debian/xen-kconfig: a comment, then the options it sets
DEBIAN_FRAGMENT = "## a comment line\nCONFIG_DEBUG=n\n"

STATUS = """Package: libxenmisc4.17
Status: install ok installed
Source: xen
Version: 4.17.5+72-g01140da4e8-1

Package: xen-utils-4.17
Status: install ok installed
Priority: optional
Source: xen
Version: 4.17.5+72-g01140da4e8-1
Description: XEN administrative tools
 The userspace tools to manage a system virtualized through the XEN virtual
 Version: 9.9 (a continuation line is not a field)

Package: xen-utils-4.20
Status: deinstall ok config-files
Source: xen
Version: 4.20.4+63-g7abfd2bce2-0+deb13u1

Package: libbinnmu
Status: install ok installed
Source: libsrc (1.2-3)
Version: 1.2-3+b1
"""


def test_the_config_is_debian_s_fragment_with_shadow_paging_on():
    config = kconfig_with(DEBIAN_FRAGMENT, XEN_BUILD_OPTIONS)
    assert kconfig_value(config, "CONFIG_SHADOW_PAGING") == "y"
    assert kconfig_value(config, "CONFIG_DEBUG") == "n"
    assert config.startswith(DEBIAN_FRAGMENT)


def test_an_option_the_fragment_sets_otherwise_is_replaced_not_doubled():
    fragment = "CONFIG_DEBUG=n\n# CONFIG_SHADOW_PAGING is not set\nCONFIG_PV=y\n"
    config = kconfig_with(fragment, {"CONFIG_SHADOW_PAGING": "y"})
    assert config == "CONFIG_DEBUG=n\nCONFIG_PV=y\nCONFIG_SHADOW_PAGING=y\n"
    config = kconfig_with("CONFIG_SHADOW_PAGING=n\n", {"CONFIG_SHADOW_PAGING": "y"})
    assert config.count("SHADOW") == 1 and kconfig_value(config, "CONFIG_SHADOW_PAGING") == "y"


def test_the_source_version_is_that_of_dom0_s_installed_tools():
    assert installed_source(STATUS, "xen-utils-4.17") == ("xen", "4.17.5+72-g01140da4e8-1")
    # a binNMU: the binary's version is not its source's
    assert installed_source(STATUS, "libbinnmu") == ("libsrc", "1.2-3")
    with pytest.raises(BuildError, match="xen-utils-4.20 is not installed"):
        installed_source(STATUS, "xen-utils-4.20")  # only its config files are left
    with pytest.raises(BuildError):
        installed_source(STATUS, "xen-utils-4.19")


def test_the_cache_key_follows_the_version_and_the_config():
    config = kconfig_with(DEBIAN_FRAGMENT, XEN_BUILD_OPTIONS)
    key = xen_build_key("4.17.5+72-g01140da4e8-1", config)
    assert key.startswith("4.17.5+72-g01140da4e8-1-")
    assert key == xen_build_key("4.17.5+72-g01140da4e8-1", config)
    assert key != xen_build_key("4.17.6-1", config)
    assert key != xen_build_key("4.17.5+72-g01140da4e8-1", DEBIAN_FRAGMENT)


def test_debian_s_fragment_is_read_from_the_debian_tarball(tmp_path: Path):
    dsc = tmp_path / "xen_4.17.5-1.dsc"
    dsc.write_text("Format: 3.0 (quilt)\n")
    with tarfile.open(tmp_path / "xen_4.17.5-1.debian.tar.xz", "w:xz") as tar:
        data = DEBIAN_FRAGMENT.encode()
        info = tarfile.TarInfo("debian/xen-kconfig")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert ImageBuilder._debian_kconfig(dsc) == DEBIAN_FRAGMENT
    other = tmp_path / "xen_4.18-1.dsc"
    other.write_text("")
    with pytest.raises(BuildError, match="no debian tarball"):
        ImageBuilder._debian_kconfig(other)


def test_qemu_boots_the_built_hypervisor_when_there_is_one():
    images = Images(Path("/images"), "6.1")
    assert images.xen == Path("/images/xen")
    images.built_xen = Path("/cache/xen-build/4.17.5-1-abc/xen")
    cmd = qemu_command(images, Path("/run"), Path("/src"))
    assert cmd[cmd.index("-kernel") + 1] == "/cache/xen-build/4.17.5-1-abc/xen"
    assert images.packaged_xen == Path("/images/xen")  # what complete() looks for


def test_the_default_host_builds_its_hypervisor():
    assert SUITES["bookworm"].build_xen
    assert not SUITES["trixie"].build_xen  # packaged (README: its source was not to be had)
