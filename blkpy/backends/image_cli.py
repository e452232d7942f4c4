"""`blkpy image ...`: create, info, check, convert (same words and exit codes as qemu-img)."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import click

from blkpy.backends import FORMATS, DiskError, open_disk, probe_format
from blkpy.backends.qcow2 import FileStorage
from blkpy.qcow2 import check as qcheck
from blkpy.qcow2.header import COMPRESSION_NAMES
from blkpy.qcow2.layout import CreateOptions, new_image
from blkpy.qcow2.metadata import Metadata

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
             "P": 1 << 50, "E": 1 << 60}
_CHUNK = 1 << 20
CHECK_UNSUPPORTED = 63  # qemu-img check on a format without checks


def parse_size(text: str) -> int:
    """A size with an optional qemu-img suffix (K, M, G, T, P, E; powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpPeEbB]?)\s*", text)
    if not m:
        raise ValueError(f"invalid size {text!r} (use a number with an optional K, M, G "
                         "or T suffix)")
    value = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    size = int(value * _SUFFIXES[m.group(2).upper()])
    if size >= 1 << 63:
        raise ValueError(f"size {text!r} is too large")
    return size


def _fail_cleanly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Operator errors become one line on stderr and exit status 1, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (DiskError, OSError, ValueError) as exc:
            msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            name = getattr(exc, "filename", None)
            if isinstance(exc, OSError) and name:
                msg = f"{name}: {msg}"
            click.echo(f"blkpy image: {msg}", err=True)
            sys.exit(1)

    return wrapper


@click.group()
def image() -> None:
    """Create, inspect, check and convert disk images."""


# ---- create ------------------------------------------------------------------------------

_BOOL = {"on": True, "off": False, "true": True, "false": False}


def parse_create_options(text: str | None) -> dict[str, Any]:
    """``-o key=value,...`` as CreateOptions keyword arguments."""
    out: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key == "cluster_size":
            out[key] = parse_size(value)
        elif key == "refcount_bits":
            out[key] = int(value)
        elif key == "compat":
            out[key] = {"v2": "0.10", "v3": "1.1"}.get(value, value)
        elif key in ("extended_l2", "lazy_refcounts"):
            if value not in _BOOL:
                raise ValueError(f"option {key} expects on or off, not {value!r}")
            out[key] = _BOOL[value]
        elif key in ("compression_type", "backing_file"):
            out[key] = value
        elif key == "backing_fmt":
            out["backing_format"] = value
        elif key == "preallocation":
            if value != "off":
                raise ValueError("only preallocation=off is supported")
        else:
            raise ValueError(f"invalid option {key!r} (known: cluster_size, compat, "
                             "refcount_bits, extended_l2, lazy_refcounts, compression_type, "
                             "backing_file, backing_fmt)")
    return out


def _backing_size(image_path: str, backing: str, fmt: str | None) -> tuple[str, int]:
    """Format and size of a backing file named relative to the new image's directory."""
    path = backing if os.path.isabs(backing) else os.path.join(
        os.path.dirname(os.path.abspath(image_path)), backing)
    fmt = fmt or probe_format(path)
    with open_disk(path, fmt, readonly=True) as disk:
        return fmt, disk.size


def create_image(path: str, fmt: str, size: int | None, backing: str | None = None,
                 backing_fmt: str | None = None, options: dict[str, Any] | None = None) -> int:
    """Create ``path``; returns its virtual size."""
    options = dict(options or {})
    backing = backing or options.pop("backing_file", None)
    backing_fmt = backing_fmt or options.pop("backing_format", None)
    if fmt == "raw":
        if options or backing:
            raise ValueError("raw images take no options and no backing file")
        if size is None:
            raise ValueError("an image size is needed")
        with open(path, "wb") as f:
            f.truncate(size)
        return size
    if fmt != "qcow2":
        raise ValueError(f"unknown image format {fmt!r} (expected raw or qcow2)")
    if backing:
        backing_fmt, bsize = _backing_size(path, backing, backing_fmt)
        size = bsize if size is None else size
    if size is None:
        raise ValueError("an image size is needed")
    data = new_image(CreateOptions(size=size, backing_file=backing, backing_format=backing_fmt,
                                   **options))
    with open(path, "wb") as f:
        f.write(data)
    return size


@image.command("create")
@click.option("-f", "fmt", default="raw", type=click.Choice(FORMATS), help="Image format.")
@click.option("-b", "backing", help="Backing file (relative to the new image's directory).")
@click.option("-F", "backing_fmt", type=click.Choice(FORMATS), help="Backing file format.")
@click.option("-o", "opts", help="cluster_size=,compat=,refcount_bits=,extended_l2=on,"
              "lazy_refcounts=on,compression_type=zlib|zstd")
@click.option("-q", "quiet", is_flag=True, help="Print nothing on success.")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("size", required=False)
@_fail_cleanly
def create_cmd(fmt: str, backing: str | None, backing_fmt: str | None, opts: str | None,
               quiet: bool, file: str, size: str | None) -> None:
    """Create FILE of SIZE bytes (K, M, G, T suffixes); SIZE defaults to the backing's."""
    options = parse_create_options(opts)
    nbytes = create_image(file, fmt, None if size is None else parse_size(size), backing,
                          backing_fmt, options)
    if not quiet:
        click.echo(f"Formatting '{file}', fmt={fmt} size={nbytes}")


# ---- info --------------------------------------------------------------------------------


def _open_metadata(path: str) -> tuple[int, Metadata]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fd, Metadata(FileStorage(fd), os.fstat(fd).st_size, writable=False)
    except BaseException:
        os.close(fd)
        raise


def image_info(path: str, fmt: str | None = None, depth: int = 0) -> dict[str, Any]:
    """What ``info`` shows, as a JSON-ready dict (backing chain nested)."""
    if depth > 64:
        raise DiskError("backing chain deeper than 64 (a loop?)")
    if not os.path.exists(path):
        raise DiskError(f"cannot open {path}: No such file or directory")
    fmt = fmt or probe_format(path)
    st = os.stat(path)
    info: dict[str, Any] = {"filename": path, "format": fmt,
                            "actual-size": st.st_blocks * 512}
    if fmt == "raw":
        with open_disk(path, "raw", readonly=True) as disk:
            info["virtual-size"] = disk.size
        return info
    fd, meta = _open_metadata(path)
    try:
        h = meta.header
        info["virtual-size"] = h.size
        info["cluster-size"] = h.cluster_size
        info["dirty-flag"] = h.dirty
        info["format-specific"] = {
            "compat": "1.1" if h.version == 3 else "0.10",
            "compression-type": COMPRESSION_NAMES.get(h.compression_type, "?"),
            "lazy-refcounts": h.lazy_refcounts,
            "refcount-bits": h.refcount_bits,
            "corrupt": h.corrupt,
            "extended-l2": h.extended_l2,
        }
        info["snapshots"] = [
            {"id": s.id, "name": s.name, "vm-state-size": s.vm_state_size,
             "date-sec": s.date_sec, "date-nsec": s.date_nsec,
             "vm-clock-nsec": s.vm_clock_nsec}
            for s in meta.snapshots()]
        if h.backing_file:
            full = h.backing_file if os.path.isabs(h.backing_file) else os.path.join(
                os.path.dirname(os.path.abspath(path)), h.backing_file)
            info["backing-filename"] = h.backing_file
            info["full-backing-filename"] = full
            if h.backing_format:
                info["backing-filename-format"] = h.backing_format
            try:
                info["backing-image"] = image_info(full, h.backing_format, depth + 1)
            except DiskError as exc:  # the top image is still worth showing
                info["backing-error"] = str(exc)
    finally:
        os.close(fd)
    return info


def _human(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _print_info(info: dict[str, Any]) -> None:
    click.echo(f"image: {info['filename']}")
    click.echo(f"file format: {info['format']}")
    click.echo(f"virtual size: {_human(info['virtual-size'])} ({info['virtual-size']} bytes)")
    click.echo(f"disk size: {_human(info['actual-size'])}")
    if "cluster-size" in info:
        click.echo(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        if info["backing-filename"] != info["full-backing-filename"]:
            line += f" (actual path: {info['full-backing-filename']})"
        click.echo(line)
        if "backing-filename-format" in info:
            click.echo(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        click.echo("Snapshot list:")
        click.echo(f"{'ID':<8}{'TAG':<24}{'VM SIZE':>10}  DATE")
        for s in info["snapshots"]:
            click.echo(f"{s['id']:<8}{s['name']:<24}{_human(s['vm-state-size']):>10}  "
                       f"{s['date-sec']}")
    spec = info.get("format-specific")
    if spec:
        click.echo("Format specific information:")
        for key, value in spec.items():
            if isinstance(value, bool):
                value = str(value).lower()
            click.echo(f"    {key.replace('-', ' ')}: {value}")
    if "backing-error" in info:
        click.echo(f"backing file problem: {info['backing-error']}")
    if "backing-image" in info:
        click.echo("")
        _print_info(info["backing-image"])


@image.command("info")
@click.option("-f", "fmt", type=click.Choice(FORMATS), help="Image format (default: probe).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("file", type=click.Path(dir_okay=False))
@_fail_cleanly
def info_cmd(fmt: str | None, as_json: bool, file: str) -> None:
    """Show format, sizes, backing chain and snapshots of FILE."""
    info = image_info(file, fmt)
    if as_json:
        click.echo(json.dumps(info, indent=4))
    else:
        _print_info(info)


# ---- check -------------------------------------------------------------------------------


@image.command("check")
@click.option("-f", "fmt", type=click.Choice(FORMATS), help="Image format (default: probe).")
@click.argument("file", type=click.Path(dir_okay=False))
def check_cmd(fmt: str | None, file: str) -> None:
    """Check FILE's metadata. Exit status: 0 clean, 2 corrupt, 3 leaks only, 1 check
    failed, 63 format without checks (as qemu-img check)."""
    try:
        fmt = fmt or probe_format(file)
        if fmt != "qcow2":
            click.echo(f"blkpy image: {file}: this image format does not support checks",
                       err=True)
            sys.exit(CHECK_UNSUPPORTED)
        fd, meta = _open_metadata(file)
        try:
            result = qcheck.check_image(meta)
        finally:
            os.close(fd)
    except (DiskError, OSError, ValueError) as exc:
        click.echo(f"blkpy image: cannot check {file}: {exc}", err=True)
        sys.exit(qcheck.CHECK_INCOMPLETE)
    for line in result.messages[:1000]:
        click.echo(line)
    if len(result.messages) > 1000:
        click.echo(f"... {len(result.messages) - 1000} more")
    if result.corruptions:
        click.echo(f"\n{result.corruptions} errors were found on the image.\n"
                   "Data may be corrupted, or further writes to the image may corrupt it.")
    if result.leaks:
        click.echo(f"\n{result.leaks} leaked clusters were found on the image.\n"
                   "This means waste of disk space, but no harm to data.")
    if not result.corruptions and not result.leaks:
        click.echo("No errors were found on the image.")
    click.echo(f"Image end offset: {result.image_end}")
    sys.exit(result.status)


# ---- convert -----------------------------------------------------------------------------


def convert_image(src: str, dst: str, src_fmt: str | None, out_fmt: str,
                  options: dict[str, Any], progress: Callable[[int], None] | None = None) -> None:
    """Copy SRC's guest contents into a new DST, leaving zero areas unallocated."""
    src_fmt = src_fmt or probe_format(src)
    with open_disk(src, src_fmt, readonly=True) as sdisk:
        size = sdisk.size
        create_image(dst, out_fmt, size, options=options)
        with open_disk(dst, out_fmt) as ddisk:
            grain = getattr(ddisk, "cluster_size", 4096)
            chunk = max(_CHUNK, grain)
            buf = bytearray(chunk)
            zero = bytes(grain)
            for pos in range(0, size, chunk):
                n = min(chunk, size - pos)
                view = memoryview(buf)[:n]
                sdisk.readv(pos, [view])
                for start, end in _nonzero_runs(view, grain, zero):
                    ddisk.writev(pos + start, [view[start:end]])
                if progress:
                    progress(n)
            ddisk.flush()


def _nonzero_runs(view: memoryview, grain: int, zero: bytes) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for start in range(0, len(view), grain):
        end = min(start + grain, len(view))
        if view[start:end] == zero[:end - start]:
            continue
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


@image.command("convert")
@click.option("-f", "src_fmt", type=click.Choice(FORMATS), help="Source format (default: probe).")
@click.option("-O", "out_fmt", default="raw", type=click.Choice(FORMATS), help="Output format.")
@click.option("-o", "opts", help="Output options, as for create.")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@_fail_cleanly
def convert_cmd(src_fmt: str | None, out_fmt: str, opts: str | None, src: str,
                dst: str) -> None:
    """Copy SRC into a new image DST (progress bar when stdout is a terminal)."""
    options = parse_create_options(opts)
    if not sys.stdout.isatty():
        convert_image(src, dst, src_fmt, out_fmt, options)
        return
    fmt = src_fmt or probe_format(src)
    with open_disk(src, fmt, readonly=True) as disk:
        total = disk.size
    with click.progressbar(length=total, label="converting", file=sys.stdout) as bar:
        convert_image(src, dst, fmt, out_fmt, options, progress=bar.update)
