#!/usr/bin/env bash
# Installs everything blkpy and its tests need on a Debian machine (run as root or with sudo):
# the Debian peers the tests compare against, then blkpy itself with its test extras in a
# virtual environment, .venv (Debian's own Python refuses system-wide pip installs).
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

DEB_PACKAGES=(
    gcc python3-dev python3-venv   # building the cffi helper
    qemu-utils                     # qemu-img: the qcow2 oracle and bench peer
    fio                            # raw I/O ceiling for bench
    xenstore-utils                 # real xenstore clients for the simulated xenstored
    nbdkit nbdkit-plugin-python    # blkpy fuzz crashes: storage that fails on demand (EIO)
    libnbd-bin fuse3               #   under the backend: nbdfuse puts it in a FUSE file
    libnbd-dev                     # nbd backend: libnbd's C API (in place into guest pages);
                                   #   its tests serve through nbdkit and qemu-nbd (qemu-utils)
    gnutls-bin                     #   certtool: X.509 certificates for the NBD TLS test
    ceph-mon ceph-osd ceph-common  # rbd backend tests: a one-node Ceph (mon + memstore OSD, no
                                   #   mgr) and the rbd tool that checks what the guest wrote;
                                   #   ceph-common brings librbd1, which the backend dlopens
    librbd-dev                     # <rbd/librbd.h>: the rbd data path (rbdio.c) is typed by it;
                                   #   a test checks blkpy's librbd declarations
    flex bison                     # the xenlab's own Xen hypervisor build (Kconfig's parser;
                                   #   tests/xenlab/README.md: Debian's lacks shadow paging)
)
missing=()
for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[test]"
