# Helpers shared by the dom0 lab scripts (sourced).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
XENBIN=$(ls -d /usr/lib/xen-4.*/bin 2>/dev/null | tail -1)  # 4.17 or 4.20, whichever host this is
export PATH=$PATH:$XENBIN
LAB=/var/lib/lab
DOMU_KERNEL=/usr/lib/blkpy-lab/vmlinux
DOMU_INITRD=/mnt/run/domU-initrd.img
CONSOLE_DIR=/var/log/xen/console
DAEMON_LOG=/var/log/xen/blkpy-daemon.log
[ -f /mnt/run/lab.env ] && . /mnt/run/lab.env
# debug_on KNOB: the run was started with `lab run --debug KNOB,...` (lab.py DEBUG_KNOBS)
debug_on() { case " ${LAB_DEBUG:-} " in *" $1 "*) return 0 ;; esac; return 1; }

up() { cut -d' ' -f1 /proc/uptime; }
mark() { echo "LAB-MARK: $* uptime=$(up)"; }
# check NAME PASS|FAIL|SKIP DETAIL... (also kept in a file so boot.sh can tell the verdict)
check() { local n=$1 o=$2; shift 2; echo "LAB-CHECK: $n $o $*" | tee -a /tmp/lab-checks.log; }
check_cond() { # check_cond NAME DETAIL -- command...: PASS iff the command succeeds
  local n=$1 d=$2; shift 3
  if "$@"; then check "$n" PASS "$d"; else check "$n" FAIL "$d"; fi
}
figure() { echo "LAB-FIGURE: $*"; }

phase_limit() { # seconds a phase may take (under TCG) before boot.sh kills it
  case $1 in blkback) echo 300 ;; func) echo 600 ;; life) echo 600 ;; qcow2) echo 500 ;; stress) echo 900 ;; vbd3) echo 600 ;;
    lifecycle) echo 1500 ;; nbd) echo 500 ;; *) echo 300 ;; esac
}

install_blkpy() {
  # A private copy of the package (the 9p checkout is read-only and its native helper, if
  # any, was built for the host), plus the helper built for dom0's Python by the harness.
  rm -rf /opt/blkpy && mkdir -p /opt/blkpy
  (cd /mnt/src && tar -cf - --exclude='__pycache__' --exclude='*.so' blkpy) | tar -xf - -C /opt/blkpy
  cp /mnt/run/native/_native*.so /opt/blkpy/blkpy/gntdev/ || { echo "no native helper staged"; return 1; }
  cat > /usr/local/bin/blkpy <<'SH'
#!/bin/sh
PYTHONPATH=/opt/blkpy exec python3 -c 'import sys; from blkpy.cli import main; sys.argv[0] = "blkpy"; main()' "$@"
SH
  chmod 755 /usr/local/bin/blkpy
}

# mkcfg NAME CFG KERNEL-ARGS DISK-SPEC... : a PV busybox guest with the given disks
mkcfg() {
  local name=$1 cfg=$2 args=$3; shift 3
  local disks="" d
  for d in "$@"; do disks="$disks'$d', "; done
  cat > "$cfg" <<CFG
name = "$name"
type = "pv"
kernel = "$DOMU_KERNEL"
ramdisk = "$DOMU_INITRD"
memory = 256
vcpus = ${VCPUS:-1}
extra = "console=hvc0 $args"
disk = [ $disks ]
on_poweroff = "destroy"
on_crash = "destroy"
on_reboot = "${ON_REBOOT:-destroy}"
CFG
}

console_log() { echo "$CONSOLE_DIR/guest-$1.log"; }

# xl_create CFG NAME: create a domain, with xl monitoring it (on_reboot etc.) in the
# background. Not plain `xl create`: its daemonizing monitor child sometimes dies with a
# segfault in libc under this dom0 ("domain monitoring daemonizing child [364] died due to
# fatal signal Segmentation fault"), and the guest is then never restarted on reboot.
xl_create() {
  xl create -F "$1" >>"/var/log/xen/xl-$2.log" 2>&1 &
  local pid=$! t=0 state
  while [ $t -lt 240 ]; do
    if ! kill -0 $pid 2>/dev/null; then
      wait $pid; echo "xl create $1 ended early (rc $?)"; tail -5 "/var/log/xen/xl-$2.log"; return 1
    fi
    state=$(xl list "$2" 2>/dev/null | awk 'NR == 2 {print $5}')
    case $state in "" | *p*) ;; *) return 0 ;; esac  # paused while its devices attach
    sleep 0.5; t=$((t + 1))
  done
  echo "xl create $1: domain not running after 120 s"; return 1
}

# wait_console NAME PATTERN TIMEOUT [through-reboot]: wait until the guest's console shows
# PATTERN; fails early when the domain is gone, unless a reboot may be in between
wait_console() {
  local log t=0
  log=$(console_log "$1")
  while [ "$t" -lt "$3" ]; do
    grep -q -- "$2" "$log" 2>/dev/null && return 0
    if grep -q "ended (signal" $DAEMON_LOG 2>/dev/null; then  # a serve crashed: no point waiting
      echo "a serve crashed: $(grep "ended (signal" $DAEMON_LOG | head -1)"; return 1
    fi
    if [ -z "$4" ] && ! xl domid "$1" >/dev/null 2>&1; then
      sleep 1; grep -q -- "$2" "$log" 2>/dev/null; return
    fi
    sleep 1; t=$((t + 1))
  done
  return 1
}

# wait_gone NAME TIMEOUT: wait until the domain no longer exists
wait_gone() {
  local t=0
  while [ "$t" -lt "$2" ]; do
    xl domid "$1" >/dev/null 2>&1 || return 0
    sleep 1; t=$((t + 1))
  done
  return 1
}

# relay_console NAME PHASE: the guest's CHECK/FIGURE lines as lab lines, and a copy of the log
relay_console() {
  local log
  log=$(console_log "$1")
  cp "$log" "/mnt/run/console-$2-$1.log" 2>/dev/null
  sed -n 's/\r$//; s/^CHECK: /LAB-CHECK: '"$2"'./p; s/^FIGURE: /LAB-FIGURE: '"$2"'./p' "$log" 2>/dev/null \
    | tee -a /tmp/lab-checks.log
}

# no_blkback PHASE: unload xen-blkback if an earlier phase left it loaded (vbd3 does): it
# would claim every backend/vbd device, blkpy's phy disks included
no_blkback() {
  lsmod | grep -q '^xen_blkback' && rmmod xen_blkback
  check_cond "$1.no-blkback" "xen-blkback not loaded" -- sh -c '! lsmod | grep -q "^xen_blkback"'
}

# console_value NAME TAG: VALUE of the guest's last "TAG: VALUE" console line
console_value() { sed -n "s/\r\$//; s/^$2: //p" "$(console_log "$1")" 2>/dev/null | tail -1; }

cleanup_domains() {
  local d
  for d in $(xl list 2>/dev/null | awk 'NR > 1 && $2 != 0 {print $1}'); do xl destroy "$d" 2>/dev/null; done
}

serve_pids() { pgrep -f 'blkpy serve' | tr '\n' ' '; }

# is_hole FILE START END: no data (only a hole) in [START, END) of FILE
is_hole() {
  python3 - "$@" <<'PY'
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    nxt = os.lseek(fd, int(sys.argv[2]), os.SEEK_DATA)
except OSError as e:
    nxt = os.fstat(fd).st_size if e.errno == errno.ENXIO else -1
sys.exit(0 if nxt >= int(sys.argv[3]) else 1)
PY
}

# how many pages the kernel has moved under running processes so far (migration, compaction)
vmstat_mark() {
  mark "vmstat $1: $(grep -E '^(pgmigrate_success|pgmigrate_fail|compact_stall|compact_success|thp_fault_alloc|thp_collapse_alloc|numa_pages_migrated) ' /proc/vmstat | tr '\n' ' ')"
}

# Diagnostics of `lab run --debug`, for the serves the daemon is about to fork.
start_debug() {
  vmstat_mark start
  mark "mm: thp $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo none), compaction_proactiveness $(cat /proc/sys/vm/compaction_proactiveness 2>/dev/null || echo none)"
  if debug_on cores; then  # any dom0 process that crashes leaves its core in the run directory
    ulimit -c unlimited
    echo '/mnt/run/core.%e.%p' > /proc/sys/kernel/core_pattern
  fi
  if debug_on freshcheck && [ -z "$(cat /run/freshcheck.pid 2>/dev/null)" ]; then
    [ -x /tmp/freshcheck ] || gcc -O2 -pthread -o /tmp/freshcheck "$(dirname "${BASH_SOURCE[0]}")/freshcheck.c"
    /tmp/freshcheck tlb 15 >> /mnt/run/freshcheck.log 2>&1
    mark "freshcheck: $(grep 'tlb:' /mnt/run/freshcheck.log | tail -1)"
    /tmp/freshcheck 100000 2 >> /mnt/run/freshcheck.log 2>&1 &
    echo $! > /run/freshcheck.pid
    /tmp/freshcheck copy 100000 3 >> /mnt/run/freshcheck.log 2>&1 &
    echo $! >> /run/freshcheck.pid
  fi
}

stop_debug() {
  local pid
  vmstat_mark end
  pid=$(cat /run/freshcheck.pid 2>/dev/null) || return 0
  rm -f /run/freshcheck.pid
  for p in $pid; do kill -TERM "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  mark "freshcheck: $(grep -E 'copy:|pages checked' /mnt/run/freshcheck.log | tail -2 | tr '\n' ' ')"
  if grep -q "FRESHCHECK: BAD" /mnt/run/freshcheck.log; then
    check debug.freshcheck FAIL "damaged memory or copies: $(grep -c 'FRESHCHECK: BAD' /mnt/run/freshcheck.log) (freshcheck.log)"
  fi
}

start_daemon() {
  blkpy hotplug install >/dev/null || { check setup.hotplug-install FAIL "blkpy hotplug install"; return 1; }
  start_debug
  local malloc_env=""
  if debug_on malloc-check; then
    malloc_env="LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0 GLIBC_TUNABLES=glibc.malloc.check=3"
  fi
  env $malloc_env blkpy hotplug daemon --log-dir /var/log/xen --serve-arg=--log-level=debug >>$DAEMON_LOG 2>&1 &
  echo $! > /run/blkpy-daemon.pid
  local i=0
  until grep -q "watching" $DAEMON_LOG 2>/dev/null; do
    sleep 0.5; i=$((i + 1))
    if [ $i -gt 60 ]; then check setup.daemon FAIL "daemon did not start: $(tail -3 $DAEMON_LOG)"; return 1; fi
  done
}

stop_daemon() {
  local pid
  pid=$(cat /run/blkpy-daemon.pid 2>/dev/null) || return 0
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && { echo "daemon did not stop"; kill -KILL "$pid"; }
  rm -f /run/blkpy-daemon.pid
  stop_debug
  cp /var/log/xen/*.log /mnt/run/ 2>/dev/null
}

# check_no_leftovers PHASE: after the guests are gone, nothing of blkpy may remain
# (KILLED_PIDS: pids a phase killed on purpose, "1|2|3", are no crash)
check_no_leftovers() {
  local i=0 left
  while [ -n "$(serve_pids)" ] && [ $i -lt 30 ]; do sleep 0.5; i=$((i + 1)); done
  left=$(serve_pids)
  check_cond "$1.no-serve-left" "no blkpy serve process left ${left:+(pids $left)}" -- test -z "$left"
  left=$(grep "ended (signal" $DAEMON_LOG 2>/dev/null | grep -v -E "pid (${KILLED_PIDS:-none}) ended \(signal 9\)" \
    | head -3 | tr '\n' ' ')
  check_cond "$1.no-serve-crash" "no serve died of a signal ${left:+($left)}" -- test -z "$left"
  left=$(for k in vbd vbd3; do xenstore-list /local/domain/0/backend/$k 2>/dev/null; done | tr '\n' ' ')
  check_cond "$1.no-backend-left" "no backend/vbd or vbd3 entries left ${left:+($left)}" -- test -z "$left"
  left=$(xl list | awk 'NR > 2 {print $1 "(" $2 ")"}' | tr '\n' ' ')
  check_cond "$1.no-domain-left" "no (dying) domain left ${left:+($left)}" -- test -z "$left"
}

# show_logs: the daemon's and serves' last lines on the console (for failures)
show_logs() {
  local f
  for f in $DAEMON_LOG /var/log/xen/serve-*.log; do
    [ -f "$f" ] || continue
    echo "---- tail $f"; tail -n "${1:-15}" "$f"
  done
}
