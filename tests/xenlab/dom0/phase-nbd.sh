#!/bin/bash
# A guest whose two disks are NBD exports that qemu-nbd serves from dom0 on unix sockets,
# attached the toolstack's usual way (script=block-blkpy): xvda as target=nbd:unix:...,
# xvdb as an nbd+unix:// URI. The guest runs the functional job on them, then O_DIRECT
# streams on xvda while dom0 kills xvda's server with SIGKILL and starts it again
# (job-reconnect): no request may fail. dom0 then reads what the guest wrote through the
# exports with qemu's own NBD client, and checks the image files themselves.
. "$(dirname "$0")/lib.sh"
NBD_RUN=/run/lab-nbd
A=$LAB/nbd-a.img B=$LAB/nbd-b.img

nbd_sock() { echo "$NBD_RUN/$1.sock"; }
# nbd_start NAME IMAGE: qemu-nbd serves IMAGE as export NAME, bounded by the phase's time
# limit; returns once the export answers a handshake. The pid kept is timeout's.
nbd_start() {
  local i=0
  rm -f "$(nbd_sock "$1")"
  # --persistent and --shared: the serve, its new connection after a restart and dom0's
  # readers come and go; --discard=unmap: the guest's discard (WRITE_ZEROES that may trim)
  # punches a hole into the image, as blkpy does for a raw file
  timeout --kill-after=5 "$(phase_limit nbd)" qemu-nbd --format=raw --export-name="$1" \
    --socket="$(nbd_sock "$1")" --persistent --shared=4 --discard=unmap "$2" \
    >>"/var/log/xen/qemu-nbd-$1.log" 2>&1 &
  echo $! > "$NBD_RUN/$1.pid"
  until qemu-img info "nbd+unix:///$1?socket=$(nbd_sock "$1")" >/dev/null 2>&1; do
    sleep 0.5; i=$((i + 1))
    [ $i -lt 60 ] || { echo "qemu-nbd $1 does not answer: $(tail -3 "/var/log/xen/qemu-nbd-$1.log")"; return 1; }
  done
}
# nbd_server_pid NAME: qemu-nbd's own pid, under its timeout
nbd_server_pid() { pgrep -P "$(cat "$NBD_RUN/$1.pid" 2>/dev/null)" -x qemu-nbd; }
# nbd_stop NAME [SIGNAL]: TERM to timeout (which passes it on), or SIGNAL to qemu-nbd itself
nbd_stop() {
  local tpid
  tpid=$(cat "$NBD_RUN/$1.pid" 2>/dev/null) || return 0
  if [ -n "$2" ]; then kill "-$2" "$(nbd_server_pid "$1")"; else kill -TERM "$tpid"; fi
  wait "$tpid" 2>/dev/null
  rm -f "$NBD_RUN/$1.pid"
}
# export_md5 NAME OFFSET LENGTH: md5 of a byte range of the export, read by qemu's client
export_md5() {
  local opts="driver=raw,offset=$2,size=$3,file.driver=nbd,file.export=$1"
  opts="$opts,file.server.type=unix,file.server.path=$(nbd_sock "$1")"
  rm -f /tmp/nbd-range.raw
  qemu-img convert --image-opts "$opts" -O raw /tmp/nbd-range.raw \
    && md5sum < /tmp/nbd-range.raw | cut -d' ' -f1
  rm -f /tmp/nbd-range.raw
}

mkdir -p $NBD_RUN
trap 'nbd_stop a; nbd_stop b' EXIT
trap 'exit 124' TERM
no_blkback nbd
rm -f $A $B
truncate -s 256M $A; truncate -s 128M $B
nbd_start a $A && nbd_start b $B
rc=$?
check_cond nbd.servers "qemu-nbd serves $A and $B on unix sockets" -- test $rc -eq 0
[ $rc -eq 0 ] || exit 1
start_daemon || exit 1
mkcfg nb /tmp/nb.cfg labjob=func,reconnect \
  "format=raw,vdev=xvda,access=rw,backendtype=phy,script=block-blkpy,target=nbd:unix:$(nbd_sock a):exportname=a" \
  "format=raw,vdev=xvdb,access=rw,backendtype=phy,script=block-blkpy,target=nbd+unix:///b?socket=$(nbd_sock b)"
t0=$(up)
xl_create /tmp/nb.cfg nb
check_cond nbd.xl-create "xl create with two block-blkpy NBD disks" -- test $? -eq 0
ID=$(xl domid nb)
mark "nbd: serve processes: $(serve_pids)"
# the kill comes a second into the streams; the guest goes on until it reads dom0's stop
# block, which dom0 writes once the restarted server has served them for 3 s
if wait_console nb "MARK: reconnect-streams running" 360; then
  sleep 1
  killed=$(nbd_server_pid a)
  [ -n "$killed" ] || echo "qemu-nbd of xvda is not running: $(tail -3 /var/log/xen/qemu-nbd-a.log)"
  nbd_stop a KILL
  mark "nbd: qemu-nbd of xvda (pid $killed) killed"
  sleep 3
  nbd_start a $A
  rc=$?
  check_cond nbd.server-restarted "qemu-nbd of xvda killed (pid ${killed:-none: it was gone}), restarted after 3 s (pid $(nbd_server_pid a))" -- \
    test $rc -eq 0 -a -n "$killed"
  mark "nbd: qemu-nbd of xvda restarted"
  sleep 3
  qemu-io -f raw -c "write -P 0x53 $((100 << 20)) 4096" "nbd+unix:///a?socket=$(nbd_sock a)" >/dev/null
  check_cond nbd.stop-written "stop block written through the restarted server" -- test $? -eq 0
else
  check nbd.reconnect-streams FAIL "the guest never started its streams"
fi
wait_console nb '^DONE' 300 || check nbd.guest-done FAIL "guest did not finish"
mark "nbd guest finished after $(awk -v a="$t0" -v b="$(up)" 'BEGIN{print b-a}') s"
relay_console nb nbd
# a request that waited out the outage (at least 3 s without a server), and did not fail
stall=$(sed -n 's/^FIGURE: reconnect.stall-ms \([0-9]*\) .*/\1/p' "$(console_log nb)" | tail -1)
check_cond nbd.reconnect-held "the guest's longest request took ${stall:-?} ms: held across the outage" -- \
  test "${stall:-0}" -ge 2000
wait_gone nb 30 || xl destroy nb
check_no_leftovers nbd
# the serve's own account of the outage (logged every 2 s: reconnects, commands retried)
line=$(grep "reconnect(s)" /var/log/xen/serve-$ID-51712.log 2>/dev/null | tail -1)
reconnects=$(echo "$line" | sed -n 's/.* \([0-9]*\) reconnect(s).*/\1/p')
check_cond nbd.serve-reconnected "xvda's serve: ${line#*: }" -- test "${reconnects:-0}" -ge 1
retried=$(echo "$line" | sed -n 's/.* \([0-9]*\) command(s) retried.*/\1/p')
[ -n "$retried" ] && figure nbd.reconnect.retried "$retried" commands \
  "in flight when the server died, sent again on the new connection"
# what the guest wrote, as qemu's client reads it through the exports
want=$(console_value nb RAND-MD5)
check_cond nbd.dom0-sees-data "qemu-img reads the guest's 16 MiB at 16 MiB through the export (md5 $want)" -- \
  test -n "$want" -a "$want" = "$(export_md5 a $((16 << 20)) $((16 << 20)))"
want=$(console_value nb RECONNECT-MD5)
check_cond nbd.dom0-sees-reconnect-data "qemu-img reads the streams' 4 MiB at 96 MiB through the export (md5 $want)" -- \
  test -n "$want" -a "$want" = "$(export_md5 a $((96 << 20)) $((4 << 20)))"
check_cond nbd.discard-hole "the image has a hole at 64..72 MiB after the guest's discard ($(du -k $A | cut -f1) KiB allocated)" -- \
  is_hole $A $((64 << 20)) $((72 << 20))
out=$(e2fsck -fn $B 2>&1)
rc=$?
check_cond nbd.ext4-fsck-dom0 "e2fsck -fn of xvdb's image: $(echo "$out" | tail -1)" -- test $rc -eq 0
nbd_stop a; nbd_stop b
left=$(pgrep -x qemu-nbd | tr '\n' ' ')
check_cond nbd.servers-stopped "qemu-nbd stopped ${left:+(pids $left left)}" -- test -z "$left"
show_logs 12
stop_daemon
