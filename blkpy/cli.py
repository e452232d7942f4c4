"""blkpy's command line (click)."""

from __future__ import annotations

import dataclasses
import faulthandler
import importlib
import json
import logging
import sys

import click

from blkpy import __version__
from blkpy.defaults import (
    ENGINE_NAMES,
    MAX_PERSISTENT_GRANTS,
    MAX_QUEUES_DEFAULT,
    POLL_US_DEFAULT,
)
from blkpy.hotplug.cli import hotplug


class _LazyGroup(click.Group):
    """A group whose heavy subcommands are imported only when used."""

    lazy = {"image": "blkpy.backends.image_cli:image", "fuzz": "blkpy.fuzz.cli:fuzz"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="blkpy")
def main() -> None:
    """blkpy: a user-space Xen block backend."""


def device_tag(backend_path: str) -> str:
    """blkback's name for a device (its sysfs entry): ``vbd-<domid>-<devid>``."""
    parts = backend_path.rstrip("/").split("/")
    return "-".join(parts[-3:]) if len(parts) >= 3 else backend_path


def _setup_logging(level: str, device: str | None = None) -> None:
    # Every line names the device: a host's serves all log to one journal.
    tag = f" {device}" if device else ""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s blkpy[%(process)d]{tag} %(levelname)s %(message)s",
        stream=sys.stderr,
    )


@main.command()
@click.argument("backend_path")
@click.option("--platform", "platform_name", type=click.Choice(["linux", "sim"]),
              default="linux", show_default=True, help="Xen devices or the simulated host.")
@click.option("--xenstore", "xenstore_path", metavar="PATH",
              help="xenstored socket or /dev/xen/xenbus (default: XENSTORED_PATH, then the "
                   "standard socket paths).")
@click.option("--sim-dir", metavar="DIR", help="Simulated hypervisor state (sim platform; "
              "default BLKPY_SIM_DIR).")
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2", "nbd", "rbd"]),
              help="Image format; default: the prefix in the params node (raw:, qcow2:, "
                   "nbd:, rbd:), else raw. Never guessed from the image's contents.")
@click.option("--image", metavar="PATH", help="Image to serve instead of the params node.")
@click.option("--engine", type=click.Choice(ENGINE_NAMES), default="auto",
              show_default=True, help="I/O engine: auto is io_uring for --direct-io images "
              "(sync where the kernel refuses io_uring) and sync on the page cache.")
@click.option("--grant-mode", type=click.Choice(["auto", "map", "copy"]), default="auto",
              show_default=True, help="Batched grant mapping or grant copy; auto: map when "
              "persistent grants were negotiated, else copy.")
@click.option("--persistent/--no-persistent", default=True, show_default=True,
              help="Offer persistent grants.")
@click.option("--max-persistent-grants", type=click.IntRange(0, 65536),
              default=MAX_PERSISTENT_GRANTS,
              show_default=True, help="Guest pages kept mapped per ring (each holds a Xen "
              "maptrack entry); beyond it pages are mapped per batch.")
@click.option("--max-indirect-segments", type=click.IntRange(0, 1024), default=256,
              show_default=True, help="Advertised; preadv takes at most 1024 iovecs.")
@click.option("--max-ring-page-order", type=click.IntRange(0, 4), default=4, show_default=True)
@click.option("--max-queues", type=click.IntRange(1, 64), default=MAX_QUEUES_DEFAULT,
              show_default=True)
@click.option("--poll-us", type=click.IntRange(0, 10000), default=POLL_US_DEFAULT,
              show_default=True, help="Most the ring is busy-polled before sleeping (the "
              "budget adapts to the load and shrinks to nothing on an idle device; 0: never).")
@click.option("--sector-size", type=click.Choice(["512", "4096"]), default="512",
              show_default=True, help="Logical sector size of a raw image.")
@click.option("--direct-io", is_flag=True, help="Open raw images with O_DIRECT (bypass "
              "dom0's page cache; requests then go through io_uring so that the guest's queue depth "
              "reaches the device).")
@click.option("--qcow2-cache-mb", type=click.IntRange(1, 4096), default=4, show_default=True,
              help="Metadata cache of a qcow2 image (L2 tables; refcounts get a quarter).")
@click.option("--stats-file", metavar="PATH", help="Write counters as JSON here on exit and "
              "on SIGUSR1 (default: BLKPY_STATS_FILE).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.option("--resume", is_flag=True, help="Take over a connected device whose serve "
              "died or handed it over (SIGUSR2), from its rings' journals, without the guest "
              "seeing a state change (the hotplug daemon does this by itself).")
@click.option("--replace", type=click.IntRange(1), metavar="PID", help="Upgrade: once "
              "loaded, have serve PID of the same device hand it over, then take it over.")
@click.option("--standby-fd", type=click.IntRange(0), hidden=True, help="A standby "
              "successor (the hotplug daemon's): ready, it waits for a byte on this pipe "
              "before it takes the device over.")
def serve(backend_path: str, platform_name: str, xenstore_path: str | None,
          sim_dir: str | None, fmt: str | None, image: str | None, engine: str,
          grant_mode: str, persistent: bool, max_persistent_grants: int,
          max_indirect_segments: int,
          max_ring_page_order: int, max_queues: int, poll_us: int, sector_size: str,
          direct_io: bool, qcow2_cache_mb: int, stats_file: str | None,
          log_level: str, resume: bool, replace: int | None, standby_fd: int | None) -> None:
    """Serve one virtual block device: BACKEND_PATH is its backend directory, e.g.
    backend/vbd/<domid>/<devid> (relative paths are under /local/domain/<self>)."""
    # A serve never speaks TLS: without this, asyncio loads OpenSSL (~4 MiB resident per
    # device). A serve forked by the hotplug daemon already shares the daemon's copy.
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    # A crash in native code leaves every thread's Python stack in the serve's log.
    faulthandler.enable(all_threads=True)
    from blkpy.platform import PlatformError, open_platform
    from blkpy.serve import ServeError, ServeOptions
    from blkpy.serve import serve as run_serve

    _setup_logging(log_level, device_tag(backend_path))
    options = ServeOptions(
        fmt=fmt, image=image, engine=engine, grant_mode=grant_mode, persistent=persistent,
        max_persistent_grants=max_persistent_grants,
        max_indirect_segments=max_indirect_segments, max_ring_page_order=max_ring_page_order,
        max_queues=max_queues, poll_us=poll_us, sector_size=int(sector_size),
        direct_io=direct_io, qcow2_cache_size=qcow2_cache_mb << 20, stats_file=stats_file,
        resume=resume, replace=replace, standby_fd=standby_fd,
    )
    try:
        kwargs = {"sim_dir": sim_dir} if platform_name == "sim" else {}
        platform = open_platform(platform_name, xenstore_path=xenstore_path, **kwargs)
        status = run_serve(backend_path, platform, xenstore_path, options)
    except (ServeError, PlatformError) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(status)


@main.group()
def sim() -> None:
    """The simulated Xen host (xenstored, guests) for tests and demos."""


@sim.command("run")
@click.argument("image", required=False, type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]),
              help="Image format (default: from the file's header; this is your own file).")
@click.option("--workload", type=click.Choice(["verify", "randrw"]), default="verify",
              show_default=True)
@click.option("--requests", type=click.IntRange(1), default=2000, show_default=True)
@click.option("--abi", type=click.Choice(["x86_64-abi", "x86_32-abi", "arm-abi"]),
              default="x86_64-abi", show_default=True)
@click.option("--ring-order", type=click.IntRange(0, 4), default=0, show_default=True)
@click.option("--indirect-segments", type=click.IntRange(0, 4096), default=32,
              show_default=True, help="The guest's max_indirect_segments (<= 11: none).")
@click.option("--queue-depth", type=click.IntRange(1, 512), default=32, show_default=True)
@click.option("--readonly", is_flag=True, help="Attach the disk read-only.")
@click.option("--persistent/--no-persistent", default=True, show_default=True,
              help="Whether the guest offers persistent grants.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--serve-arg", "serve_args", multiple=True, metavar="ARG",
              help="Extra argument for the `blkpy serve` subprocess (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def sim_run(image: str | None, fmt: str | None, workload: str, requests: int, abi: str,
            ring_order: int, indirect_segments: int, queue_depth: int, readonly: bool,
            persistent: bool, seed: int, serve_args: tuple[str, ...], as_json: bool) -> None:
    """Simulate a Xen host serving IMAGE (default: a temporary sparse raw image) to a
    guest running WORKLOAD; exits non-zero on any data mismatch or protocol error."""
    from blkpy.backends import DiskError
    from blkpy.sim.run import SimRunConfig, run

    config = SimRunConfig(
        image=image, fmt=fmt, workload=workload, requests=requests, abi=abi,
        ring_order=ring_order, indirect_segments=indirect_segments, readonly=readonly,
        persistent=persistent, queue_depth=queue_depth, seed=seed, serve_args=serve_args,
    )
    try:
        result = run(config)
    except DiskError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(result) | {"ok": result.ok}, indent=2,
                              default=str))
    else:
        _print_sim_result(result)
    sys.exit(0 if result.ok else 1)


def _print_sim_result(result) -> None:  # noqa: ANN001 - SimRunResult, imported lazily
    cfg, disk = result.config, result.disk
    click.echo(f"image     {cfg['image']} ({cfg['fmt']}), {disk.get('sectors', '?')} sectors "
               f"of {disk.get('sector_size', '?')} B, abi {cfg['abi']}, ring order "
               f"{cfg['ring_order']}")
    click.echo("features  " + ", ".join(
        k for k in ("flush", "barrier", "discard", "persistent") if disk.get(k))
        + f", indirect {disk.get('max_indirect_segments', 0)}")
    if result.report:
        click.echo(result.report)
    platform = result.backend.get("platform", {})
    if platform:
        click.echo("backend   " + ", ".join(f"{k}={v}" for k, v in platform.items()))
    if result.ok:
        click.echo("result    OK")
    else:
        for problem in result.problems:
            click.echo(f"problem   {problem}", err=True)
        click.echo("result    FAILED", err=True)


@sim.command("xenstored")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False),
              help="Unix socket to listen on (clients find it through XENSTORED_PATH).")
def sim_xenstored(socket_path: str) -> None:
    """Run a simulated xenstored in the foreground until SIGTERM/SIGINT."""
    from blkpy.xenstore.server import run_xenstored

    run_xenstored(socket_path)


@main.command(context_settings={"ignore_unknown_options": True}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Benchmark blkpy against fio on one file (options: `blkpy bench --help`)."""
    from blkpy.bench.benchmark import bench_command

    bench_command.main(args=list(args), prog_name="blkpy bench")


RUN_DIR_OPTION = click.option(
    "--run-dir", type=click.Path(file_okay=False), default=None,
    help="Where the serves publish their status (default: BLKPY_RUN_DIR, then /run/blkpy).")


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 86400}d{s % 86400 // 3600:02d}h" if s >= 86400 else (
        f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s")


@main.command("list")
@RUN_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object per device, in a list.")
def list_devices(run_dir: str | None, as_json: bool) -> None:
    """Every running `blkpy serve`: what it serves and how, and its rates over the last
    interval (about a second)."""
    from pathlib import Path

    from blkpy.status import read_all

    devices = read_all(Path(run_dir) if run_dir else None)
    if as_json:
        click.echo(json.dumps([d.to_json() for d in devices], indent=2))
        return
    header = ("DOMID", "DEVID", "STATE", "QUEUES", "ORDER", "GRANTS", "ENGINE", "FORMAT",
              "UPTIME", "IOPS", "RD MB/s", "WR MB/s", "IMAGE")
    rows = [(str(d.domid), str(d.devid), d.state, str(d.queues), str(d.ring_order),
             d.grant_mode, d.engine, d.format, _duration(d.uptime), f"{d.iops:.0f}",
             f"{d.read_mb_s:.1f}", f"{d.write_mb_s:.1f}", d.image) for d in devices]
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    for r in [header, *rows]:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


@main.command("stats")
@click.argument("domid", type=click.IntRange(0, 0x7FEF))
@click.argument("devid", type=click.IntRange(0, 2**31 - 1))
@RUN_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="The counters as JSON.")
def device_stats(domid: int, devid: int, run_dir: str | None, as_json: bool) -> None:
    """One device's counters under blkback's names (oo_req, rd_req, wr_req, f_req,
    ds_req, rd_sect, wr_sect), errors, and latency percentiles when known."""
    from pathlib import Path

    from blkpy.status import COUNTERS, find

    status = find(domid, devid, Path(run_dir) if run_dir else None)
    if status is None:
        click.echo(f"blkpy stats: no running blkpy serve for domain {domid} device {devid}",
                   err=True)
        sys.exit(1)
    counters = {name: int(status.counters.get(name, 0)) for name in COUNTERS}
    extra = {k: v for k, v in status.counters.items() if k not in counters}
    if as_json:
        click.echo(json.dumps({"domid": domid, "devid": devid, **counters, **extra,
                               "iops": status.iops, "read_mb_s": status.read_mb_s,
                               "write_mb_s": status.write_mb_s}, indent=2))
        return
    for name, value in {**counters, **extra}.items():
        click.echo(f"{name:<16}{value}")


def _limit(text: str | None, what: str, sizes: bool) -> int | None:
    if text is None:
        return None
    from blkpy.backends.image_cli import parse_size

    try:
        value = parse_size(text) if sizes else int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a {'size' if sizes else 'whole number'}",
                                 param_hint=what) from None
    if value < 0:
        raise click.BadParameter("must not be negative", param_hint=what)
    return value


@main.command("qos")
@click.argument("domid", type=click.IntRange(1, 0x7FEF))
@click.argument("devid", type=click.IntRange(0, 2**31 - 1))
@click.option("--xenstore", "xenstore_path", metavar="PATH",
              help="xenstored socket or /dev/xen/xenbus (default: XENSTORED_PATH, then the "
                   "standard socket paths).")
@click.option("--backend-domid", type=click.IntRange(0, 0x7FEF), default=0, show_default=True)
@click.option("--clear", is_flag=True, help="Remove every limit first.")
@click.option("--show", is_flag=True, help="Print the limits in force afterwards.")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE",
              help="A limit by its node name: iops-total|read|write, bps-total|read|write "
                   "(bytes/s; K/M/G suffixes), each also with -max and -max-length; "
                   "0 removes it (repeatable).")
def qos_command(domid: int, devid: int, xenstore_path: str | None, backend_domid: int,
                clear: bool, show: bool, settings: tuple[str, ...]) -> None:
    """Set a disk's I/O limits (QEMU throttling semantics) while it runs, e.g.
    `blkpy qos 5 51712 --set iops-total=500 --set bps-write=20M`. The serve applies
    them at once; they live in xenstore under the backend (<backend>/qos/)."""
    from blkpy.hotplug.cli import connected_xenstore
    from blkpy.qos import NODES, QosError, parse_limits

    wanted: dict[str, int] = {}
    for item in settings:
        name, _, value = item.partition("=")
        if name not in NODES or not value:
            raise click.BadParameter(f"{item!r}: want NAME=VALUE with NAME one of "
                                     f"{', '.join(NODES[:6])} (+ -max, -max-length)",
                                     param_hint="--set")
        wanted[name] = _limit(value, name, sizes=name.startswith("bps") and
                              not name.endswith("-max-length"))  # type: ignore[assignment]
    with connected_xenstore(xenstore_path) as xs:
        found = [kind for kind in ("vbd", "vbd3")
                 if xs.read_str(f"/local/domain/{backend_domid}/backend/{kind}/{domid}/{devid}")
                 is not None]  # type: ignore[attr-defined]
        if not found:
            raise click.ClickException(f"no block device {devid} of domain {domid} "
                                       f"(backend/vbd or backend/vbd3)")
        base = f"/local/domain/{backend_domid}/backend/{found[0]}/{domid}/{devid}/qos"
        current = {} if clear else {
            n: xs.read_str(f"{base}/{n}") or "" for n in xs.children(base)}  # type: ignore[attr-defined]
        merged = {**current, **{k: str(v) for k, v in wanted.items()}}
        merged = {k: v for k, v in merged.items() if v not in ("", "0")}
        try:
            limits = parse_limits(merged)
        except QosError as exc:
            raise click.ClickException(str(exc)) from None
        nodes = limits.to_nodes()

        def write(tx: int) -> None:
            xs.rm(base, tx=tx)  # type: ignore[attr-defined]
            for name, value in nodes.items():
                xs.write(f"{base}/{name}", value, tx=tx)  # type: ignore[attr-defined]
            if not nodes:
                xs.write(base, "", tx=tx)  # type: ignore[attr-defined]

        xs.run_transaction(write)  # type: ignore[attr-defined]
    if show:
        for name, value in nodes.items():
            click.echo(f"{name}={value}")


@main.group()
def ctl() -> None:
    """Pause and resume a running disk (tap-ctl's pause/unpause), e.g. for a live external
    snapshot: pause, `qemu-img create -f qcow2 -b OLD -F FMT NEW`, resume --image NEW."""


def _control(domid: int, devid: int, run_dir: str | None, request: dict[str, object]) -> None:
    import socket
    from pathlib import Path

    from blkpy import status

    base = Path(run_dir) if run_dir else status.run_dir()
    if status.find(domid, devid, base) is None:
        raise click.ClickException(f"no running blkpy serve for domain {domid} device {devid}")
    path = base / f"vbd-{domid}-{devid}" / "control"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(60)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = json.loads(sock.makefile().readline() or "{}")
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot reach the serve of domain {domid} device "
                                   f"{devid}: {exc}") from None
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error", "failed")))
    click.echo(f"domain {domid} device {devid}: {'paused' if reply.get('paused') else 'running'}"
               f" on {reply.get('image')}")


@ctl.command("pause")
@click.argument("domid", type=click.IntRange(1, 0x7FEF))
@click.argument("devid", type=click.IntRange(0, 2**31 - 1))
@RUN_DIR_OPTION
def ctl_pause(domid: int, devid: int, run_dir: str | None) -> None:
    """Stop taking requests, finish those in flight, close the image (the guest waits)."""
    _control(domid, devid, run_dir, {"command": "pause"})


@ctl.command("resume")
@click.argument("domid", type=click.IntRange(1, 0x7FEF))
@click.argument("devid", type=click.IntRange(0, 2**31 - 1))
@click.option("--image", metavar="PATH", help="Serve this image from now on (same size).")
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]),
              help="Its format (default: the current one).")
@RUN_DIR_OPTION
def ctl_resume(domid: int, devid: int, image: str | None, fmt: str | None,
               run_dir: str | None) -> None:
    """Re-open the image (or --image, refused if its size differs) and serve again."""
    _control(domid, devid, run_dir, {"command": "resume", "image": image, "format": fmt})


main.add_command(hotplug)

if __name__ == "__main__":
    main()
