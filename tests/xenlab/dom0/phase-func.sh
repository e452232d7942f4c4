#!/bin/bash
# blkpy serves a guest's three disks (raw rw, raw rw for ext4, raw read-only) through the
# block-blkpy hotplug script and the watcher daemon; the guest runs the functional job, then
# the same perf job as the blkback phase. dom0 then checks the images.
. "$(dirname "$0")/lib.sh"
start_daemon || exit 1
rm -f $LAB/func-a.img $LAB/func-b.img $LAB/func-c.img
truncate -s 256M $LAB/func-a.img; truncate -s 128M $LAB/func-b.img
yes LAB-RO-PATTERN | head -c 33554432 > $LAB/func-c.img
RO_MD5=$(md5sum < $LAB/func-c.img)
mkcfg fn /tmp/fn.cfg labjob=func,ro,perf \
  "format=raw,vdev=xvda,access=rw,backendtype=phy,script=block-blkpy,target=$LAB/func-a.img" \
  "format=raw,vdev=xvdb,access=rw,backendtype=phy,script=block-blkpy,target=raw:$LAB/func-b.img" \
  "format=raw,vdev=xvdc,access=ro,backendtype=phy,script=block-blkpy,target=$LAB/func-c.img"
t0=$(up)
xl_create /tmp/fn.cfg fn
check_cond func.xl-create "xl create with three block-blkpy disks" -- test $? -eq 0
mark "func: serve processes: $(serve_pids)"
wait_console fn '^DONE' 480 || check func.guest-done FAIL "guest did not finish in 480 s"
mark "func guest finished after $(awk -v a="$t0" -v b="$(up)" 'BEGIN{print b-a}') s"
relay_console fn func
wait_gone fn 30 || xl destroy fn
# dom0's view of what the guest wrote
want=$(sed -n 's/\r$//; s/^RAND-MD5: //p' "$(console_log fn)")
got=$(dd if=$LAB/func-a.img bs=64k skip=256 count=256 2>/dev/null | md5sum | cut -d' ' -f1)
check_cond func.dom0-sees-data "image bytes at 16 MiB = guest's md5 $want" -- test -n "$want" -a "$want" = "$got"
check_cond func.discard-hole "image has a hole at 64..72 MiB after the guest's discard ($(du -k $LAB/func-a.img | cut -f1) KiB allocated)" -- \
  is_hole $LAB/func-a.img $((64 << 20)) $((72 << 20))
check_cond func.ro-image-unchanged "read-only image md5 unchanged" -- test "$(md5sum < $LAB/func-c.img)" = "$RO_MD5"
check_no_leftovers func
show_logs 25
stop_daemon
