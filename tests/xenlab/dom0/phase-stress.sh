#!/bin/bash
# Not a test of blkpy (no daemon, no serve, no disk): does this emulated machine keep the
# memory of ordinary processes intact? Diskless two-vCPU guests are created one after the
# other (the waiting loops fork xl, grep and command substitutions all along) while
# freshcheck maps, writes and unmaps memory beside them. Any dom0 process that dies of a
# signal (core in the run directory, "segfault" in the kernel log), any guest segfault and
# any damage freshcheck sees is the machine's fault. In the qcow2 phase, bash subshells of
# xl_create's polling loop, grep, xenstored and blkpy serves died of heap corruption.
. "$(dirname "$0")/lib.sh"
SECONDS_TO_RUN=${LAB_STRESS_SECONDS:-180}
ulimit -c unlimited
echo '/mnt/run/core.%e.%p' > /proc/sys/kernel/core_pattern
gcc -O2 -pthread -o /tmp/freshcheck "$(dirname "$0")/freshcheck.c" || { check stress.build FAIL "gcc freshcheck.c"; exit 1; }
segv_before=$(dmesg | grep -c "segfault at")
/tmp/freshcheck tlb 10 >> /mnt/run/freshcheck.log 2>&1
/tmp/freshcheck "$((SECONDS_TO_RUN + 60))" 2 >> /mnt/run/freshcheck.log 2>&1 &
churn=$!
domains=0 failed=0 guest_segv=0
report() {
  kill -TERM $churn 2>/dev/null
  wait $churn
  fc=$?
  segv=$(( $(dmesg | grep -c "segfault at") - segv_before ))
  cores=$(ls /mnt/run/core.* 2>/dev/null | tr '\n' ' ')
  figure "stress.domains $domains"
  mark "freshcheck: $(grep -E 'tlb:|pages checked' /mnt/run/freshcheck.log | tr '\n' ' ')"
  check_cond stress.freshcheck "no foreign write into fresh memory, no stale TLB entry (freshcheck.log)" -- test $fc -eq 0
  check_cond stress.no-crash "$domains diskless guests ($failed did not finish): $segv dom0 segfaults, $guest_segv guest segfaults, dom0 cores: ${cores:-none}" -- \
    test $failed -eq 0 -a $segv -eq 0 -a $guest_segv -eq 0 -a -z "$cores"
}
trap 'report; exit 1' TERM  # the phase's time limit: still say what was seen
end=$((SECONDS + SECONDS_TO_RUN))
while [ $SECONDS -lt $end ]; do
  name=st$domains
  VCPUS=2 mkcfg $name /tmp/st.cfg ""
  xl create -F /tmp/st.cfg >>/var/log/xen/xl-$name.log 2>&1 &
  xlpid=$!
  for _ in $(seq 1 60); do xl domid $name >/dev/null 2>&1 && break; sleep 1; done
  wait_console $name '^DONE' 90 || failed=$((failed + 1))
  timeout 30 xl destroy $name >/dev/null 2>&1
  kill $xlpid 2>/dev/null
  wait $xlpid 2>/dev/null
  n=$(grep -c "segfault at" "$(console_log $name)" 2>/dev/null)
  guest_segv=$((guest_segv + ${n:-0}))
  domains=$((domains + 1))
  mark "stress: $domains guests, $failed did not finish, $guest_segv guest segfaults, dom0 cores: $(ls /mnt/run/core.* 2>/dev/null | wc -l)"
done
report
