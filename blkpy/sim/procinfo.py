"""What a backend process holds, read from /proc: resident memory, open fds, mappings.

The benchmark's memory row and the soak campaign read the same figures, so both take
them from here."""

from __future__ import annotations

import dataclasses
import os

_KIB = 1024


@dataclasses.dataclass(frozen=True)
class ProcessFigures:
    """One sample of a process (sizes in KiB, as /proc gives them)."""

    rss_anon: int
    rss_file: int
    rss_shmem: int  # shared memory: in the simulator, the guest pages a backend maps
    pss: int
    fds: int
    maps: int  # lines of /proc/PID/maps (virtual memory areas) but the guest's
    guest_maps: int  # mappings of guest memory (grant mappings, under ``guest_prefix``)

    @property
    def own_kib(self) -> int:
        """The process's own resident memory: anonymous and file pages. Guest pages it
        keeps mapped (persistent grants: shared memory in the simulator, foreign frames on
        Xen) are the guest's memory, so they are left out."""
        return self.rss_anon + self.rss_file

    @property
    def rss_kib(self) -> int:
        return self.rss_anon + self.rss_file + self.rss_shmem


def _fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in names:
                out[name] = int(rest.split()[0])
    return out


def sample(pid: int, guest_prefix: str | None = None) -> ProcessFigures:
    """The figures of a live process (raises OSError if it is gone). Mappings of files
    under ``guest_prefix`` (the simulator's guest memory) are counted apart: how many
    there are follows how the guest's grants happen to lie, not what the process keeps."""
    status = _fields(f"/proc/{pid}/status", ("RssAnon", "RssFile", "RssShmem"))
    rollup = _fields(f"/proc/{pid}/smaps_rollup", ("Pss",))
    maps = guest_maps = 0
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            # address perms offset dev inode [path]: the path is the sixth field
            fields = line.split(maxsplit=5)
            if guest_prefix and len(fields) == 6 and fields[5].startswith(guest_prefix):
                guest_maps += 1
            else:
                maps += 1
    return ProcessFigures(
        rss_anon=status["RssAnon"],
        rss_file=status["RssFile"],
        rss_shmem=status.get("RssShmem", 0),
        pss=rollup["Pss"],
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        maps=maps,
        guest_maps=guest_maps,
    )


def mib(kib: float) -> float:
    return kib / _KIB
