#!/bin/bash
# Life cycle with blkpy (see the guest's job-life): hot attach/detach with the format-probing
# trap, frontend close, reboot, then xl destroy with I/O in flight; nothing may be left.
. "$(dirname "$0")/lib.sh"
start_daemon || exit 1
SECRET=$LAB/secret.img   # the file the guest's fake qcow2 header names as backing file
rm -f $LAB/life-a.img $LAB/probe.img
truncate -s 64M $LAB/life-a.img; truncate -s 16M $LAB/probe.img
yes LAB-SECRET-DATA | head -c 4194304 > $SECRET
touch -a -d 2000-01-01 $SECRET   # any read of it would move the access time forward
SECRET_ATIME=$(stat -c %X $SECRET)
PROBE_DISK="format=raw,vdev=xvdb,access=rw,backendtype=phy,script=block-blkpy,target=$LAB/probe.img"
ON_REBOOT=restart mkcfg lf /tmp/lf.cfg labjob=life \
  "format=raw,vdev=xvda,access=rw,backendtype=phy,script=block-blkpy,target=$LAB/life-a.img"
xl_create /tmp/lf.cfg lf
check_cond life.xl-create "xl create" -- test $? -eq 0
ID1=$(xl domid lf)
step() { # step MARKER SECONDS [through-reboot]: wait for the guest, or give up on the phase
  wait_console lf "$1" "$2" "$3" && return 0
  check "life.$1" FAIL "guest never printed '$1'"; relay_console lf life; show_logs; exit 1
}
step "MARK: life-ready" 240
xl block-attach lf "$PROBE_DISK"
check_cond life.block-attach "xl block-attach xvdb" -- test $? -eq 0
step "MARK: probe-written" 180
serve_b=$(pgrep -f "blkpy serve backend/vbd/$ID1/51728")
xl block-detach lf xvdb
check_cond life.block-detach "xl block-detach xvdb" -- test $? -eq 0
for _ in $(seq 1 40); do [ -z "$(pgrep -f "blkpy serve backend/vbd/$ID1/51728")" ] && break; sleep 0.5; done
check_cond life.detach-serve-exited "xvdb's serve (pid $serve_b) exited after the detach" -- \
  test -n "$serve_b" -a -z "$(pgrep -f "blkpy serve backend/vbd/$ID1/51728")"
xl block-attach lf "$PROBE_DISK"
check_cond life.block-reattach "xl block-attach xvdb again" -- test $? -eq 0
step "MARK: probe-checked" 180
opened=$(ls -l /proc/[0-9]*/fd 2>/dev/null | grep -c "$SECRET")
check_cond life.probe-backing-untouched \
  "host file named as backing file: atime $(stat -c %X $SECRET) (was $SECRET_ATIME), open by $opened processes" -- \
  test "$(stat -c %X $SECRET)" = "$SECRET_ATIME" -a "$opened" = 0
step "MARK: xvda-unbound" 120
BE=/local/domain/0/backend/vbd/$ID1/51712
for _ in $(seq 1 20); do [ "$(xenstore-read $BE/state 2>/dev/null)" = 6 ] && break; sleep 0.5; done
serve_a=$(pgrep -f "blkpy serve backend/vbd/$ID1/51712")
check_cond life.frontend-closed \
  "frontend Closed: backend state $(xenstore-read $BE/state 2>&1), online $(xenstore-read $BE/online 2>&1), serve ${serve_a:-gone}" -- \
  test "$(xenstore-read $BE/state 2>/dev/null)" = 6 -a -n "$serve_a"
step "MARK: rebooting" 240
step "MARK: io-running" 300 through-reboot
ID2=$(xl domid lf)
check_cond life.rebooted "the reboot made a new domain ($ID1 -> $ID2)" -- test -n "$ID2" -a "$ID2" != "$ID1"
sleep 3
victims=$(pgrep -f "blkpy serve backend/vbd/$ID2/" | tr '\n' ' ')
t0=$(up)
xl destroy lf
check_cond life.destroy "xl destroy with I/O in flight" -- test $? -eq 0
for _ in $(seq 1 60); do [ -z "$(pgrep -f "blkpy serve backend/vbd/$ID2/")" ] && break; sleep 0.5; done
check_cond life.destroy-serve-exited \
  "serve (pids $victims) gone $(awk -v a="$t0" -v b="$(up)" 'BEGIN{print b-a}') s after xl destroy" -- \
  test -n "$victims" -a -z "$(pgrep -f "blkpy serve backend/vbd/$ID2/")"
clean=1
for pid in $victims; do grep -q "serve pid $pid ended (exit status 0)" $DAEMON_LOG || clean=0; done
check_cond life.destroy-clean-exit "every destroyed device's serve exited with status 0" -- test $clean = 1
relay_console lf life
check_no_leftovers life
show_logs 12
stop_daemon
