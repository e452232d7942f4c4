#!/bin/bash
# Issue 9 on real Xen: a disk that outlives its serve. The guest (domU/job-lifecycle) runs
# a verifying O_DIRECT workload on xvda (raw) and xvdb (qcow2) while dom0, one kind at a time:
#   kill      kill -9 both serves (pid from kthread-pid); the daemon's successor takes over
#   upgrade   blkpy hotplug restart DOMID DEVID for both disks (a new serve from the code on disk)
#   snapshot  blkpy ctl pause, qemu-img create -b OLD, blkpy ctl resume --image NEW, per disk
#   save      xl save, xl restore (blkfront's resume path, new serves for the new domain)
#   migrate   xl migrate DOM localhost (the old and the new domain exist together)
# dom0 names the kind on xvdc, a raw control disk; the guest reports each kind's stall, failed
# requests, kernel I/O errors and checked data. Then every image must pass qemu-img check.
. "$(dirname "$0")/lib.sh"
ROUNDS=${LAB_LIFECYCLE_ROUNDS:-10}
# kill last: in two runs, dom0 processes died of damaged memory right after the guest
# started its I/O or right after the first kill -9 (tests/xenlab/README.md); snapshot after
# save and migrate: those rebuild the disks from libxl's config, which still names the old
# image after a live snapshot
KINDS=${LAB_LIFECYCLE_KINDS:-upgrade save migrate snapshot kill}
RAW=$LAB/lc-raw.img QCOW=$LAB/lc-base.qcow2 CTL=$LAB/lc-ctl.img
DISKS="51712 51728"  # xvda (raw), xvdb (qcow2)
# seconds between kills of one serve: the daemon starts at most 5 successors of a device
# within 60 s (a serve that keeps dying is left dead)
KILL_SPACING=13
rm -f $LAB/lc-* $LAB/lc.save
truncate -s 64M $RAW; truncate -s 1M $CTL
qemu-img create -q -f qcow2 $QCOW 64M || { check lifecycle.create FAIL "qemu-img create"; exit 1; }
start_daemon || exit 1
# one vCPU, one single-page ring per disk: with two queues, then with 4-page rings, dom0
# processes (serves connecting, bash, xl) died of damaged memory within seconds of the
# guest's first I/O (tests/xenlab/README.md); the sim covers both
mkcfg lc /tmp/lc.cfg "labjob=lifecycle lcblocks=${LAB_LIFECYCLE_BLOCKS:-16}" \
  "format=raw,vdev=xvda,access=rw,backendtype=phy,script=block-blkpy,target=raw:$RAW" \
  "format=raw,vdev=xvdb,access=rw,backendtype=phy,script=block-blkpy,target=qcow2:$QCOW" \
  "format=raw,vdev=xvdc,access=rw,backendtype=phy,script=block-blkpy,target=raw:$CTL"
xl_create /tmp/lc.cfg lc
check_cond lifecycle.xl-create "xl create with a raw, a qcow2 and a control disk" -- test $? -eq 0
# answer the guest's clock pings on the control disk before its streams start: the lab lines
# the guest's slow requests up with the serves' hand-over windows on dom0's clock, and the
# guest's wall clock was found ~0.2 s behind it (tests/xenlab/handovers.py)
python3 "$(dirname "$0")/clock-echo.py" $CTL 16 300 &
mark "lifecycle: serves $(serve_pids); $(free -m | awk '/Mem:/ {print "dom0 MB used " $3 " free " $4}')"

# The console log is named after the domain when xenconsoled first sees it: a migrated
# guest writes into guest-lc--incoming.log.
# (NULs as line ends: grep once ran out of memory on this log, as if it held one huge line)
lc_seen() { cat "$CONSOLE_DIR"/guest-lc*.log 2>/dev/null | tr '\0' '\n' | grep -a -q -- "$1"; }
# lc_state: what to look at when the guest is slow (every 30 s of waiting, and on failure)
lc_state() {
  mark "waiting for '$1': console $(ls -l "$CONSOLE_DIR" | awk 'NR > 1 {print $NF, $5}' | tr '\n' ' ')," \
    "$(free -m | awk '/Mem:/ {print "dom0 MB used " $3 " free " $4}'), serves $(serve_pids)"
  tail -c 600 "$CONSOLE_DIR"/guest-lc*.log 2>/dev/null | tr -cd '[:print:]\n' | tail -5
}
wait_lc() { # wait_lc PATTERN SECONDS
  local t=0
  while [ $t -lt "$2" ]; do
    lc_seen "$1" && return 0
    sleep 1; t=$((t + 1))
    [ $((t % 30)) = 0 ] && lc_state "$1"
  done
  lc_state "$1"
  return 1
}
finish() {
  local log
  for log in "$CONSOLE_DIR"/guest-lc*.log; do relay_console "$(basename "$log" .log | sed 's/^guest-//')" lifecycle; done
  show_logs 20
}
domid() { xl domid lc 2>/dev/null; }
be() { echo "/local/domain/0/backend/vbd/$(domid)/$1"; }
since() { awk -v a="$1" -v b="$(up)" 'BEGIN { printf "%.2f", b - a }'; }

# begin KIND: name the kind on the control disk, wait until the guest's window for it is open
begin() {
  printf 'lc-kind %s\n' "$1" | dd of=$CTL bs=4096 count=1 conv=sync,notrunc 2>/dev/null
  if ! wait_lc "MARK: lc-window $1" 300; then
    check "lifecycle.$1.window" FAIL "the guest never opened the window of $1"; finish; exit 1
  fi
  mark "lifecycle: $1 (domain $(domid))"
}

# states_connected WHAT: every backend and frontend state of the guest's disks is still 4
states_connected() {
  local d id bad=""
  id=$(domid)
  for d in $DISKS 51744; do
    [ "$(xenstore-read "/local/domain/0/backend/vbd/$id/$d/state" 2>/dev/null)" = 4 ] || bad="$bad be/$d"
    [ "$(xenstore-read "/local/domain/$id/device/vbd/$d/state" 2>/dev/null)" = 4 ] || bad="$bad fe/$d"
  done
  check_cond "lifecycle.$1.states" "backend and frontend states stay Connected${bad:+ (not: $bad)}" -- test -z "$bad"
}

# new_serve BACKEND OLD-PID SECONDS: wait until another serve wrote its pid; prints it
new_serve() {
  local t=0 pid
  while [ $t -lt $(($3 * 20)) ]; do
    pid=$(xenstore-read "$1/kthread-pid" 2>/dev/null)
    [ -n "$pid" ] && [ "$pid" != "$2" ] && kill -0 "$pid" 2>/dev/null && { echo "$pid"; return 0; }
    sleep 0.05; t=$((t + 1))
  done
  return 1
}

takeovers() { # takeovers: how many successors took a device of the guest over so far
  cat /var/log/xen/serve-*-51712.log /var/log/xen/serve-*-51728.log 2>/dev/null | grep -c "took the device over"
}

kind_kill() {
  local r d pid new t0 worst=0 failed=0 before
  before=$(takeovers)
  for r in $(seq 1 "$ROUNDS"); do
    t0=$(up)
    for d in $DISKS; do
      pid=$(xenstore-read "$(be $d)/kthread-pid")
      KILLED_PIDS="${KILLED_PIDS:+$KILLED_PIDS|}$pid"
      kill -KILL "$pid"
      if new=$(new_serve "$(be $d)" "$pid" 30); then
        mark "kill $r: $d serve $pid -> $new after $(since "$t0") s"
      else
        failed=$((failed + 1)); mark "kill $r: $d: no successor"
      fi
    done
    sleep "$(awk -v a="$t0" -v b="$(up)" -v s=$KILL_SPACING 'BEGIN { d = s - (b - a); print (d > 0 ? d : 0) }')"
  done
  export KILLED_PIDS
  sleep 2
  check_cond lifecycle.kill.successors "$ROUNDS x 2 serves killed: $(( $(takeovers) - before )) takeovers logged, $failed without successor" -- \
    test $failed -eq 0 -a $(( $(takeovers) - before )) -eq $((ROUNDS * 2))
  states_connected kill
}

kind_upgrade() {
  local r d out worst=0 failed=0 ms pids
  for r in $(seq 1 "$ROUNDS"); do
    pids=""
    for d in $DISKS; do
      # --timeout: under emulation a new serve needs 8-27 s to load before it asks for
      # the hand-over (the default 30 s failed 2 of 20 upgrades that did complete)
      (blkpy hotplug restart --timeout 120 "$(domid)" $d > /tmp/lc-upgrade.$d 2>&1
       echo $? >> /tmp/lc-upgrade.$d) &
      pids="$pids $!"
    done
    wait $pids  # not a bare wait: the hotplug daemon is a child of this shell too
    for d in $DISKS; do
      out=$(cat /tmp/lc-upgrade.$d)
      mark "upgrade $r: $(echo "$out" | tr '\n' ' ')"
      [ "$(echo "$out" | tail -1)" = 0 ] || failed=$((failed + 1))
      ms=$(echo "$out" | sed -n 's/.* in \([0-9]*\) ms$/\1/p')
      [ -n "$ms" ] && [ "$ms" -gt $worst ] && worst=$ms
    done
  done
  figure lifecycle.upgrade.restart-command-ms $worst ms "longest blkpy hotplug restart, request to successor's pid"
  # each successor logs the window a second after its takeover: from the old serve's
  # last request taken to its own rings served, on dom0's clock (the guest's stall is
  # that plus what was in flight, plus the emulation's own hiccups)
  sleep 2
  local windows
  windows=$(cat /var/log/xen/serve-"$(domid)"-*.log 2>/dev/null \
            | sed -n 's/.*hand-over window \([0-9]*\) ms.*/\1/p' | sort -n)
  if [ -n "$windows" ]; then
    figure lifecycle.upgrade.window-ms "$(echo "$windows" | tail -1)" ms \
      "longest of $(echo "$windows" | wc -l) hand-over windows on dom0's clock, median" \
      "$(echo "$windows" | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }') ms"
  fi
  check_cond lifecycle.upgrade.handovers "$ROUNDS x 2 upgrades, $failed failed" -- test $failed -eq 0
  states_connected upgrade
}

kind_snapshot() {
  local d base fmt r new failed=0 t0
  for d in $DISKS; do
    if [ $d = 51712 ]; then base=$RAW fmt=raw; else base=$QCOW fmt=qcow2; fi
    for r in 1 2; do
      new=$LAB/lc-$d-snap$r.qcow2
      t0=$(up)
      if blkpy ctl pause "$(domid)" $d && qemu-img create -q -f qcow2 -b "$base" -F $fmt "$new" \
          && blkpy ctl resume "$(domid)" $d --image "$new" --format qcow2; then
        mark "snapshot: $d now on $new (paused $(since "$t0") s)"
        base=$new fmt=qcow2
      else
        failed=$((failed + 1))
        blkpy ctl resume "$(domid)" $d 2>/dev/null  # never leave the guest waiting
      fi
    done
    eval "TOP_$d=$base"
  done
  check_cond lifecycle.snapshot.resumed "2 live snapshots per disk (pause, qemu-img create -b, resume --image), $failed failed" -- \
    test $failed -eq 0
  states_connected snapshot
  # what xl save or migrate would rebuild the disks from (libxl's own copy of the config)
  mark "snapshot: libxl's disk paths now: $(xl list -l lc | grep pdev_path | tr -s ' \n' ' ')"
}

kind_save() {
  local id t0 rc
  id=$(domid) t0=$(up)
  xl save lc $LAB/lc.save > /tmp/lc-save.log 2>&1
  rc=$?
  mark "save: rc $rc after $(since "$t0") s; serves: $(serve_pids)"
  check_cond lifecycle.save.xl-save "xl save (domain $id)" -- test $rc -eq 0
  xl restore -e $LAB/lc.save >> /tmp/lc-save.log 2>&1
  rc=$?
  mark "restore: rc $rc after $(since "$t0") s; domain $(domid)"
  check_cond lifecycle.save.xl-restore "xl restore -e (domain $id -> $(domid))" -- test $rc -eq 0 -a -n "$(domid)"
  [ $rc -eq 0 ] || tail -20 /tmp/lc-save.log
  rm -f $LAB/lc.save
}

# Who serves the qcow2 disk while the old and the new domain exist: one line per change of
# the set of serve processes (pid and backend path), with dom0's uptime
watch_serves() {
  local last="" cur
  while :; do
    cur=$(pgrep -af 'blkpy serve' | sed -n 's/^\([0-9]*\) .*serve \(backend[^ ]*\).*/\1:\2/p' | sort | tr '\n' ' ')
    [ "$cur" != "$last" ] && echo "$(up) $cur"
    last=$cur
    sleep 0.1
  done
}

kind_migrate() {
  local id t0 rc watcher
  printf '#!/bin/sh\n# xl migrate runs "ssh HOST xl migrate-receive": here HOST is this dom0\nshift\nexec "$@"\n' > /tmp/lab-ssh
  chmod 755 /tmp/lab-ssh
  id=$(domid) t0=$(up)
  watch_serves > /mnt/run/lifecycle-migrate-serves.log 2>&1 &
  watcher=$!
  xl migrate -e -s /tmp/lab-ssh lc localhost > /tmp/lc-migrate.log 2>&1
  rc=$?
  sleep 3
  kill $watcher; wait $watcher 2>/dev/null
  mark "migrate: rc $rc after $(since "$t0") s; domain $id -> $(domid)"
  if [ $rc -ne 0 ] && [ "${LAB_XEN_SHADOW_PAGING:-}" = n ] && [ -n "$(domid)" ] \
      && grep -q "Failed to enable logdirty: 95" /tmp/lc-migrate.log; then
    # Not blkpy's failure, nor one a retry would fix: the guest stays where it was
    check lifecycle.migrate.xl-migrate SKIP "not runnable on this Xen build:" \
      "$LAB_XEN_CONFIG has CONFIG_SHADOW_PAGING unset, and a PV guest's log-dirty mode" \
      "(live migration) needs shadow paging: libxc 'Failed to enable logdirty: 95'" \
      "(EOPNOTSUPP); HVM/PVH guests, whose log-dirty needs no shadow, need VMX, which TCG lacks"
  else
    check_cond lifecycle.migrate.xl-migrate "xl migrate lc localhost (domain $id -> $(domid))" -- test $rc -eq 0 -a -n "$(domid)"
  fi
  [ $rc -eq 0 ] || tail -20 /tmp/lc-migrate.log
  echo "---- serves during the migration (dom0 uptime, pid:backend); started at $t0"
  cat /mnt/run/lifecycle-migrate-serves.log
  grep -h -e "image" -e "lock" /var/log/xen/serve-*-51728.log | tail -8
}

if ! wait_lc "MARK: lifecycle streams running" 240; then
  check lifecycle.guest-ready FAIL "the guest's workload never started"; finish; exit 1
fi
sleep 10  # a window with nothing done to the disks: the workload's own latency
for kind in $KINDS; do
  begin $kind
  kind_$kind
  sleep 5  # requests after the kind's last action belong to its window too
done
begin end
wait_lc '^DONE' 300 || check lifecycle.guest-done FAIL "guest did not finish"
finish
wait_gone lc 30 || xl destroy lc
KILLED_PIDS=$KILLED_PIDS check_no_leftovers lifecycle
for img in $QCOW ${TOP_51712:-} ${TOP_51728:-} $LAB/lc-*-snap1.qcow2; do
  [ -f "$img" ] || continue
  out=$(qemu-img check "$img" 2>&1)
  check_cond "lifecycle.check-$(basename "$img" .qcow2)" "qemu-img check: $(echo "$out" | tr '\n' ' ' | cut -c1-160)" -- \
    sh -c "qemu-img check '$img' >/dev/null 2>&1"
done
stop_daemon
