#!/bin/bash
# Xen >= 4.19 (the trixie host): blkpy serves backendtype=tap disks (backend/vbd3, which
# xen-blkback never claims) while xen-blkback, loaded all along, serves phy disks of the
# same guest. The guest runs the functional job on blkpy's pair (raw, qcow2) and on
# blkback's pair, then I/O on all four at once (job-xstat); xentop must then show each disk
# with the request and sector counts the guest itself counted.
. "$(dirname "$0")/lib.sh"
# the guest's console is the evidence of a phase that went wrong, even one cut at its limit
save_console() {
  cp "$(console_log v3)" /mnt/run/console-vbd3-v3.log 2>/dev/null
  ps -eo pid,ppid,stat,etime,wchan:20,args > /mnt/run/ps-vbd3.txt 2>&1
  mark "vbd3 ended: xenconsoled $(pgrep -x xenconsoled || echo gone), domain $(xl domid v3 2>&1)"
}
# (also shortly before the phase's time limit: a command that hangs defers a TERM trap)
( sleep 560; save_console ) &
WATCHDOG=$!
trap 'kill $WATCHDOG 2>/dev/null; save_console' EXIT
trap 'exit 124' TERM
modprobe xen-blkback || { check vbd3.blkback-loaded FAIL "modprobe xen-blkback"; exit 1; }
start_daemon || exit 1
rm -f $LAB/v3-a.img $LAB/v3-b.qcow2 $LAB/kb-a.img $LAB/kb-b.img
truncate -s 256M $LAB/v3-a.img; truncate -s 256M $LAB/kb-a.img; truncate -s 128M $LAB/kb-b.img
out=$(blkpy image create -f qcow2 $LAB/v3-b.qcow2 128M 2>&1)
check_cond vbd3.qcow2-create "blkpy image create -f qcow2 ${out:+($out)}" -- test -f $LAB/v3-b.qcow2
# libxl takes only format raw (or vhd) for tap and writes params as aio:<target>; the
# image's real format travels in the target's prefix, which blkpy reads (qcow2:, raw:)
V3_RAW="format=raw,vdev=xvda,access=rw,backendtype=tap,script=block-blkpy,target=$LAB/v3-a.img"
V3_QCOW2="format=raw,vdev=xvdb,access=rw,backendtype=tap,script=block-blkpy,target=qcow2:$LAB/v3-b.qcow2"
KB_A="format=raw,vdev=xvdc,access=rw,backendtype=phy,target=$LAB/kb-a.img"
KB_B="format=raw,vdev=xvdd,access=rw,backendtype=phy,target=$LAB/kb-b.img"
mark "vbd3 disks: '$V3_RAW' '$V3_QCOW2' '$KB_A' '$KB_B'"
mkcfg v3 /tmp/v3.cfg labjob=func,kb,xstat "$V3_RAW" "$V3_QCOW2" "$KB_A" "$KB_B"
xl_create /tmp/v3.cfg v3
check_cond vbd3.xl-create "xl create: two tap disks for blkpy, two phy disks for blkback" -- test $? -eq 0
ID=$(xl domid v3)
BE=/local/domain/0/backend
check_cond vbd3.params "libxl's params: $(xenstore-read $BE/vbd3/$ID/51712/params 2>&1), $(xenstore-read $BE/vbd3/$ID/51728/params 2>&1)" -- \
  test "$(xenstore-read $BE/vbd3/$ID/51712/params 2>/dev/null)" = "aio:$LAB/v3-a.img" \
    -a "$(xenstore-read $BE/vbd3/$ID/51728/params 2>/dev/null)" = "aio:qcow2:$LAB/v3-b.qcow2"
step() { # step PATTERN SECONDS: wait for the guest, or give up on the phase
  wait_console v3 "$1" "$2" && return 0
  check "vbd3.guest" FAIL "guest never printed '$1'"; relay_console v3 vbd3; show_logs; exit 1
}
step "MARK: xstat-ready" 480
# who serves what, while all four disks are connected
serves=$(pgrep -af 'blkpy serve' | sed -n 's/.*blkpy serve \(backend[^ ]*\).*/\1/p' | sort | tr '\n' ' ')
check_cond vbd3.blkpy-serves-vbd3 "blkpy serves: $serves" -- \
  test "$serves" = "backend/vbd3/$ID/51712 backend/vbd3/$ID/51728 "
states=""
for dev in vbd3/$ID/51712 vbd3/$ID/51728 vbd/$ID/51744 vbd/$ID/51760; do
  states="$states $dev=$(xenstore-read $BE/$dev/state 2>/dev/null)"
done
check_cond vbd3.side-by-side "xen-blkback loaded ($(lsmod | grep -c '^xen_blkback')) and bound to the phy disks; states:$states" -- \
  sh -c "lsmod | grep -q '^xen_blkback' && test -d /sys/bus/xen-backend/devices/vbd-$ID-51744/statistics \
         && test '$states' = ' vbd3/$ID/51712=4 vbd3/$ID/51728=4 vbd/$ID/51744=4 vbd/$ID/51760=4'"
# a serve refreshes its statistics page every second: the guest has been still for longer
sleep 2
xentop -b -x -i 2 -d 1 > /mnt/run/xentop-vbd3.txt 2>&1
mark "xentop: $(grep -c VBD /mnt/run/xentop-vbd3.txt) VBD lines"
# flushes as each backend counts them (xentop shows none): blkpy stats, blkback's sysfs
{ for d in 51712:xvda 51728:xvdb; do
    echo "${d#*:} $(blkpy stats --json $ID ${d%%:*} | sed -n 's/.*"f_req": \([0-9]*\).*/\1/p')"
  done
  for d in 51744:xvdc 51760:xvdd; do
    echo "${d#*:} $(cat /sys/bus/xen-backend/devices/vbd-$ID-${d%%:*}/statistics/f_req)"
  done; } > /mnt/run/f_req-vbd3.txt
# the guest's totals (job-xstat) against xentop's last iteration, disk by disk: reads,
# sectors read and written exactly; writes up to the guest's flushes fewer (job-xstat says
# why), and the backend's flushes exactly the guest's
python3 - "$(console_log v3)" /mnt/run/xentop-vbd3.txt /mnt/run/f_req-vbd3.txt <<'PY' | while read -r kind name outcome detail; do
import re, sys
guest, flushes, f_req = {}, {}, {}
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"XSTAT: (xvd[a-z]) (\d+) (\d+) (\d+) (\d+) (\d+)", line)
    if m:
        guest[m.group(1)] = [int(x) for x in m.groups()[1:5]]
        flushes[m.group(1)] = int(m.group(6))
for line in open(sys.argv[3]):
    f = line.split()
    if len(f) == 2 and f[1].isdigit():
        f_req[f[0]] = int(f[1])
top = {}
for line in open(sys.argv[2], errors="replace"):
    m = re.search(r"VBD (\S+)\s+(\d+) .*OO:\s*(\d+)\s+RD:\s*(\d+)\s+WR:\s*(\d+)\s+RSECT:\s*(\d+)\s+WSECT:\s*(\d+)", line)
    if m:  # the last iteration wins
        devid = int(m.group(2))
        name = "xvd" + chr(ord("a") + (devid - 51712) // 16)
        top[name] = (m.group(1), [int(m.group(i)) for i in (4, 6, 5, 7)])
want = {"xvda": "Tapdisk3", "xvdb": "Tapdisk3", "xvdc": "BlkBack", "xvdd": "BlkBack"}
for disk, kind in want.items():
    g, (t_kind, t) = guest.get(disk), top.get(disk, ("missing", None))
    if g is None or t is None:
        print("check", f"xentop-{disk}", "FAIL", f"xentop {t_kind}, guest {'missing' if g is None else g}")
        continue
    names = ("RD", "RSECT", "WR", "WSECT")
    shown = " ".join(f"{n} {a}/{b}" for n, a, b in zip(names, t, g))
    fl, fr = flushes[disk], f_req.get(disk, -1)
    exact = [t[0] == g[0], t[1] == g[1], t[3] == g[3]]
    writes = g[2] - fl <= t[2] <= g[2]
    print("check", f"xentop-{disk}", "PASS" if all(exact) and writes and t_kind == kind else "FAIL",
          f"{t_kind} (want {kind}); xentop/guest: {shown} (WR may be up to the guest's "
          f"{fl} flushes short: its empty flushes count as writes)")
    print("check", f"flushes-{disk}", "PASS" if fr == fl else "FAIL",
          f"the backend's f_req {fr} = the guest's flushes {fl}")
    for n, a, b in zip(("rd_req", "rd_sect", "wr_req", "wr_sect", "f_req"), [*t, fr], [*g, fl]):
        print("figure", f"xentop.{disk}.{n}", a, f"{n.split('_')[1]} guest {b}")
PY
  if [ "$kind" = check ]; then check "vbd3.$name" "$outcome" "$detail"
  else figure "vbd3.$name" "$outcome" "$detail"; fi
done
xl destroy v3
check_cond vbd3.destroy "xl destroy" -- test $? -eq 0
wait_gone v3 30
relay_console v3 vbd3
# dom0's view of what the guest wrote through each backend
for pair in func:v3-a.img kb:kb-a.img; do
  name=${pair%%:*} img=${pair#*:}
  tag="RAND-MD5"; [ "$name" = func ] || tag="RAND-MD5.$name"
  want=$(sed -n "s/\r\$//; s/^$tag: //p" "$(console_log v3)")
  got=$(dd if=$LAB/$img bs=64k skip=256 count=256 2>/dev/null | md5sum | cut -d' ' -f1)
  check_cond vbd3.$name-dom0-sees-data "$img bytes at 16 MiB = guest's md5 $want" -- test -n "$want" -a "$want" = "$got"
done
check_cond vbd3.discard-hole "v3-a.img has a hole at 64..72 MiB after the guest's discard" -- \
  is_hole $LAB/v3-a.img $((64 << 20)) $((72 << 20))
out=$(qemu-img check $LAB/v3-b.qcow2 2>&1)
check_cond vbd3.check-qcow2 "qemu-img check: $(echo "$out" | tr '\n' ' ' | cut -c1-200)" -- \
  sh -c "qemu-img check $LAB/v3-b.qcow2 >/dev/null 2>&1"
check_no_leftovers vbd3
show_logs 12
stop_daemon
