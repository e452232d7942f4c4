"""dom0's side of the lifecycle guest's clock pings (domU/lcio.c, `lcio clock`), on the
control disk's image: each new "lc-clock-ping SEQ" on its second page is answered on its
third with "lc-clock-pong SEQ NS", NS being dom0's CLOCK_REALTIME when the ping was seen.

usage: clock-echo.py IMAGE ROUNDS TIMEOUT_S (exits after answering ping ROUNDS, or at the
timeout with status 1)"""

from __future__ import annotations

import os
import sys
import time

PING_AT, PONG_AT = 4096, 8192


def main(image: str, rounds: int, timeout: float) -> int:
    fd = os.open(image, os.O_RDWR)
    deadline, last = time.monotonic() + timeout, b""
    try:
        while time.monotonic() < deadline:
            fields = os.pread(fd, 64, PING_AT).split()
            if len(fields) >= 2 and fields[0] == b"lc-clock-ping" and fields[1] != last \
                    and fields[1].isdigit():
                seen = time.time_ns()
                os.pwrite(fd, b"lc-clock-pong %s %d\n" % (fields[1], seen), PONG_AT)
                last = fields[1]
                if int(last) >= rounds:
                    return 0
            # until the guest's first ping (its boot, 10-30 s under emulation) a slower
            # look, which leaves dom0's CPUs to the boot; then a fast one: how late a
            # ping is seen is part of the round trip that bounds the offset
            time.sleep(0.0005 if last else 0.005)
    finally:
        os.close(fd)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
