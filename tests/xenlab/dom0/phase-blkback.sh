#!/bin/bash
# Baseline: the kernel's xen-blkback serves the perf job (phy on a loop device via Xen's own
# `block` script). xen-blkback is unloaded afterwards: it would claim every backend/vbd device.
. "$(dirname "$0")/lib.sh"
modprobe xen-blkback || { check blkback.module FAIL "modprobe xen-blkback"; exit 1; }
rm -f $LAB/perf-blkback.img; truncate -s 256M $LAB/perf-blkback.img
mkcfg kb /tmp/kb.cfg labjob=perf "format=raw,vdev=xvda,access=rw,backendtype=phy,target=$LAB/perf-blkback.img"
t0=$(up)
xl_create /tmp/kb.cfg kb
check_cond blkback.xl-create "xl create with kernel blkback" -- test $? -eq 0
wait_console kb '^DONE' 240 || check blkback.guest-done FAIL "guest did not finish in 240 s"
mark "blkback guest finished after $(awk -v a="$t0" -v b="$(up)" 'BEGIN{print b-a}') s"
relay_console kb blkback
xl destroy kb 2>/dev/null
wait_gone kb 30
rmmod xen_blkback
check_cond blkback.unloaded "xen-blkback removed before the blkpy phases" -- sh -c '! lsmod | grep -q xen_blkback'
