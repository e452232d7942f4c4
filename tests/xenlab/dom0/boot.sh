#!/bin/bash
# dom0 side of a lab run (started by the image's init with the checkout at /mnt/src and the
# run directory at /mnt/run): bring up the Xen control plane, install blkpy from the checkout,
# run the phases named in /mnt/run/lab.env, each under a time limit. Exit 0 iff every phase ran
# to its end and no check failed.
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
. /mnt/run/lab.env
mark "dom0 userspace"

# devtmpfs lacks /dev/fd and /dev/std*; Xen's hotplug locking (locking.sh) spins forever on
# `stat -L /dev/stdin` without them (udev/systemd normally create them).
ln -sfn /proc/self/fd /dev/fd; ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout; ln -sfn /proc/self/fd/2 /dev/stderr
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
hostname dom0
for m in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd loop; do
  modprobe "$m" || echo "modprobe $m failed"
done
mount -t xenfs xenfs /proc/xen
mkdir -p /run/xen /run/xenstored /var/log/xen/console /var/lib/xen /var/lib/lab
XENSTORED_ROOTDIR=/run/xenstored $XENBIN/xenstored --pid-file /run/xen/xenstored.pid
i=0
until xenstore-read -s / >/dev/null 2>&1; do
  sleep 0.5; i=$((i + 1)); [ $i -gt 60 ] && { echo "xenstored did not come up"; exit 1; }
done
$XENBIN/xen-init-dom0 >/dev/null
$XENBIN/xenconsoled --pid-file /run/xen/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
mark "xen control plane up"

install_blkpy || exit 1
mark "blkpy installed ($(blkpy --version 2>&1))"

failed=0
for phase in $LAB_PHASES; do
  mark "phase $phase start"
  timeout --kill-after=10 "$(phase_limit "$phase")" bash "$HERE/phase-$phase.sh"
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "LAB-CHECK: $phase.completed FAIL phase script rc=$rc (124 = phase time limit)"
    failed=1
  else
    echo "LAB-CHECK: $phase.completed PASS"
  fi
  cleanup_domains
  stop_daemon  # a phase that gave up early may have left it running
  # A phase's images are its own, and dom0's disk keeps only a few hundred MiB free: left
  # behind, the earlier phases' images took the room the lifecycle's `xl save` needs for
  # the guest's memory (ENOSPC).
  rm -rf "${LAB:?}"/*
  # each phase starts its own daemon: keep this phase's log apart
  [ -f $DAEMON_LOG ] && mv $DAEMON_LOG "/mnt/run/blkpy-daemon-$phase.log"
  mark "phase $phase end"
done
cp /var/log/xen/*.log /mnt/run/ 2>/dev/null
[ $failed -eq 0 ] && ! grep -q "LAB-CHECK: [^ ]* FAIL" /tmp/lab-checks.log 2>/dev/null
