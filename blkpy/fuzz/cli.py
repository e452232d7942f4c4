"""`blkpy fuzz`: run the campaigns, print each figure, exit non-zero on any finding."""

from __future__ import annotations

import importlib
import json
import sys
import time

import click

from blkpy.fuzz import CAMPAIGNS, FULL_SCALE, CampaignResult


def _load(name: str):  # noqa: ANN202 - a Campaign
    module, attr = CAMPAIGNS[name].split(":")
    return getattr(importlib.import_module(module), attr)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("campaigns", nargs=-1, type=click.Choice(sorted(CAMPAIGNS)))
@click.option("--seed", type=int, default=None,
              help="Seed of the run (default: from the clock; printed, so any finding can "
                   "be reproduced with the same --seed).")
@click.option("--full", is_flag=True, help="The full campaign (the published figures) "
              "instead of the short version CI runs.")
@click.option("--scale", type=float, default=None, metavar="X",
              help=f"Work multiplier (1 = the CI version; --full is {FULL_SCALE:g}).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write the results as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Only the summary lines.")
def fuzz(campaigns: tuple[str, ...], seed: int | None, full: bool, scale: float | None,
         json_path: str | None, quiet: bool) -> None:
    """Fuzz the backend as a hostile guest and fail it as a faulty host.

    CAMPAIGNS: any of ring, protocol, handshake, soak, crashes (default: all)."""
    if scale is not None and scale <= 0:
        raise click.UsageError("--scale must be positive")
    scale = scale if scale is not None else (FULL_SCALE if full else 1.0)
    seed = seed if seed is not None else int(time.time()) & 0xFFFFFFFF
    names = list(campaigns) or list(CAMPAIGNS)
    click.echo(f"blkpy fuzz: seed {seed}, scale {scale:g}, campaigns {' '.join(names)}")

    def progress(msg: str) -> None:
        if not quiet:
            click.echo(f"  {msg}", err=True)

    results: list[CampaignResult] = []
    for name in names:
        result = _load(name)(seed, scale, progress)
        results.append(result)
        figures = "".join(f", {k} {v}" for k, v in result.figures.items())
        click.echo(f"{name}: {result.count} {result.unit} in {result.seconds:.1f} s, "
                   f"{len(result.findings)} finding(s){figures}")
        for finding in result.findings:
            click.echo(f"  FINDING {finding.line()}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"seed": seed, "scale": scale,
                       "campaigns": [r.to_json() for r in results]}, f, indent=2)
    if any(r.findings for r in results):
        click.echo(f"findings: reproduce with `blkpy fuzz CAMPAIGN --seed {seed}"
                   f"{f' --scale {scale:g}' if scale != 1.0 else ''}`")
        sys.exit(1)
