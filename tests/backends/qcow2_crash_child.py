"""Child of test_qcow2_crash: writes slots in a seeded order, flushing every few writes,
and prints "F <n>" after each completed flush (n = writes acknowledged before it)."""

import random
import sys

from blkpy.backends.qcow2 import Qcow2Disk

SLOT = 1536


def slot_data(seed: int, i: int) -> bytes:
    return random.Random(seed * 1_000_003 + i).randbytes(SLOT)


def plan(seed: int, size: int) -> list[int]:
    order = list(range(size // SLOT))
    random.Random(seed).shuffle(order)
    return order


def main() -> None:
    path, seed = sys.argv[1], int(sys.argv[2])
    rnd = random.Random(seed ^ 0x5EED)
    disk = Qcow2Disk(path, cache_size=int(sys.argv[3]))
    for i, slot in enumerate(plan(seed, disk.size)):
        disk.writev(slot * SLOT, [memoryview(slot_data(seed, i))])
        if rnd.random() < 0.2:
            disk.flush()
            print(f"F {i + 1}", flush=True)
    disk.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
