"""`blkpy fuzz`: the hostile-guest and faulty-host campaigns.

Each campaign lives in its own module and exposes ``run(seed, scale, progress)`` returning a
:class:`CampaignResult`. A campaign is deterministic for a given seed and scale, so
``blkpy fuzz CAMPAIGN --seed N`` reproduces any finding it printed. The judge of every
campaign is an oracle of its own (a plain model of what the guest must see), never the
validator or code path under test."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

#: campaign name -> "module:function", imported only when the campaign runs
CAMPAIGNS: dict[str, str] = {
    "ring": "blkpy.fuzz.ring_requests:run",
    "protocol": "blkpy.fuzz.protocol:run",
    "handshake": "blkpy.fuzz.handshake:run",
    "soak": "blkpy.fuzz.soak:run",
    "crashes": "blkpy.fuzz.crashes:run",
}

#: what a campaign runs at scale 1.0 is its short CI version; the full campaign (the
#: issue's figures) is ``--full``, i.e. FULL_SCALE times the work where that means more cases
FULL_SCALE = 100.0


@dataclasses.dataclass
class Finding:
    """One broken invariant, with what reproduces it."""

    campaign: str
    seed: int
    case: str  # what was fuzzed, one line (configuration, case index, mutated field)
    problem: str  # the invariant that broke and how

    def line(self) -> str:
        return f"[{self.campaign} seed={self.seed}] {self.case}: {self.problem}"


@dataclasses.dataclass
class CampaignResult:
    name: str
    unit: str  # what ``count`` counts: "requests", "handshakes", "kills", "cycles"
    count: int
    seconds: float
    findings: list[Finding] = dataclasses.field(default_factory=list)
    figures: dict[str, float | int | str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["findings"] = [dataclasses.asdict(f) for f in self.findings]
        return d


Progress = Callable[[str], None]


class Campaign(Protocol):
    def __call__(self, seed: int, scale: float, progress: Progress) -> CampaignResult: ...


class FindingLog:
    """Collects findings, keeping only the first few of each kind so a systematic bug
    does not drown the report (the count of each kind is kept)."""

    def __init__(self, campaign: str, seed: int, per_kind: int = 5) -> None:
        self.campaign = campaign
        self.seed = seed
        self.per_kind = per_kind
        self.findings: list[Finding] = []
        self.counts: dict[str, int] = {}

    def add(self, case: str, problem: str, kind: str | None = None) -> None:
        key = kind or problem.split(":")[0]
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.counts[key] <= self.per_kind:
            self.findings.append(Finding(self.campaign, self.seed, case, problem))

    @property
    def total(self) -> int:
        return sum(self.counts.values())
