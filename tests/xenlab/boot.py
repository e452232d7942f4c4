"""Boots Xen + dom0 under QEMU (TCG) once and returns what the serial console said.

The verdict comes back two ways: dom0 writes to QEMU's isa-debug-exit port (QEMU then exits
with 33 for PASS, 35 for FAIL) and prints ``LAB-RESULT: PASS|FAIL`` on the serial console.
A run always ends within ``timeout`` seconds: QEMU is killed then, and also as soon as Xen
reports that dom0 crashed or halted (``noreboot`` would otherwise keep it up until then).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import TextIO

from .images import Images

PASS_EXIT = 33  # isa-debug-exit value 16
FAIL_EXIT = 35  # value 17
# Xen keeps the machine up after dom0 dies ('noreboot'): these lines end the run early.
DOM0_GONE = re.compile(rb"Hardware Dom0 (crashed|halted|shutdown)|Panic on CPU|'noreboot' set")
# Nehalem: with QEMU's "max" CPU (even without AVX, PCID or host huge pages, on one CPU or
# two) dom0 processes and guests kept dying of damaged memory; with this older model no
# run has (tests/xenlab/README.md)
CPU_MODEL = "Nehalem"
#: QEMU accelerators the lab knows: ``tcg`` runs each vCPU on its own host thread (MTTCG),
#: ``tcg-single`` runs all vCPUs on one host thread
ACCELS = {"tcg": "tcg", "tcg-single": "tcg,thread=single"}
PROGRESS = re.compile(r"LAB-(MARK|CHECK|FIGURE|RESULT)")


@dataclasses.dataclass
class BootResult:
    verdict: str  # PASS, FAIL or TIMEOUT
    qemu_rc: int | None
    elapsed: float
    serial_log: Path
    run_dir: Path

    @property
    def text(self) -> str:
        return self.serial_log.read_bytes().decode("utf-8", "replace").replace("\r", "")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.text.splitlines()[-lines:])


def qemu_command(images: Images, run_dir: Path, src_dir: Path, *, smp: int = 2,
                 mem_mb: int = 3072, dom0_mem_mb: int = 1536, extra_dom0: str = "",
                 accel: str = "tcg", cpu: str = CPU_MODEL, xen_args: str = "") -> list[str]:
    # smap=0: with Xen's SMAP enabled, a PV dom0 faults in its first microseconds under QEMU
    # 7.2 TCG ("d0v0 Unhandled: vec 14, #PF[0001]" ... "create_bounce_frame"); smep=0 alone
    # does not help. com1 carries Xen's and (via hvc0) dom0's console.
    xen_cmd = (f"console=com1 com1=115200,8n1 dom0_mem={dom0_mem_mb}M,max:{dom0_mem_mb}M "
               f"dom0_max_vcpus={smp} loglvl=all guest_loglvl=all noreboot smap=0 smep=0 "
               f"{xen_args}").strip()
    dom0_cmd = f"root=/dev/vda console=hvc0 earlyprintk=xen init=/sbin/blkpy-lab-init {extra_dom0}"
    return [
        "qemu-system-x86_64", "-accel", ACCELS[accel], "-machine", "pc", "-cpu", cpu,
        "-m", str(mem_mb), "-smp", str(smp),
        "-display", "none", "-nodefaults", "-no-reboot", "-monitor", "none",
        "-serial", f"file:{run_dir / 'serial.log'}",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel", str(images.xen), "-append", xen_cmd,
        "-initrd", f"{images.vmlinuz} {dom0_cmd.strip()},{images.dom0_initrd}",
        # snapshot=on: the image stays pristine, every boot starts from the same dom0
        "-drive", f"file={images.dom0_disk},format=raw,if=virtio,snapshot=on,cache=unsafe",
        "-virtfs", f"local,path={src_dir},mount_tag=labsrc,security_model=none,readonly=on,id=labsrc",
        "-virtfs", f"local,path={run_dir},mount_tag=labrun,security_model=none,id=labrun",
    ]


def boot(images: Images, run_dir: Path, src_dir: Path, *, timeout: float,
         extra_dom0: str = "", echo: bool = True, accel: str = "tcg",
         cpu: str = CPU_MODEL, smp: int = 2, xen_args: str = "") -> BootResult:
    """Boot once; stream progress lines to stdout when ``echo``; never exceed ``timeout``."""
    cmd = qemu_command(images, run_dir, src_dir, extra_dom0=extra_dom0, accel=accel, cpu=cpu,
                       smp=smp, xen_args=xen_args)
    (run_dir / "qemu.cmd").write_text(shlex.join(cmd) + "\n")
    serial = run_dir / "serial.log"
    serial.write_bytes(b"")
    start = time.monotonic()
    with open(run_dir / "qemu.stderr", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        with open(run_dir / "serial.ts", "w") as stamped:
            timed_out = _follow(proc, serial, stamped, start, timeout, echo)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    elapsed = time.monotonic() - start
    rc = None if timed_out else proc.returncode
    if timed_out:
        verdict = "TIMEOUT"
    elif rc == PASS_EXIT:
        verdict = "PASS"
    elif rc == FAIL_EXIT:
        verdict = "FAIL"
    else:  # no isa-debug-exit: fall back to the serial line
        results = re.findall(r"LAB-RESULT: (\w+)", serial.read_text("utf-8", "replace"))
        verdict = "PASS" if results and results[-1] == "PASS" else "FAIL"
    return BootResult(verdict, rc, elapsed, serial, run_dir)


def _follow(proc: subprocess.Popen, serial: Path, stamped: TextIO, start: float,
            timeout: float, echo: bool) -> bool:
    """Copy new serial lines (host-timestamped) until QEMU ends; True if time ran out."""
    shown = 0
    while True:
        try:
            proc.wait(timeout=1.0)
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
        data = serial.read_bytes()
        new = data[shown:]
        if finished:
            new += b"\n"  # flush a last unterminated line
        complete = new[: new.rfind(b"\n") + 1]  # keep a partial line for the next round
        shown += len(complete)
        now = time.monotonic() - start
        for raw in complete.splitlines():
            line = raw.decode("utf-8", "replace").rstrip("\r")
            stamped.write(f"[{now:7.1f}s] {line}\n")
            if echo and PROGRESS.search(line):
                print(f"[{now:6.1f}s] {line}", flush=True)
        if finished:
            return False
        if now > timeout:
            return True
        if DOM0_GONE.search(data):
            time.sleep(2)  # let Xen finish printing the crash
            return False
