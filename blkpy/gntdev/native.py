"""Access to the compiled helper (blkpy.gntdev._native), built by pip through cffi."""

from __future__ import annotations

try:
    from blkpy.gntdev._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "blkpy's native helper is not built; reinstall with `pip install -e .`"
    ) from exc

__all__ = ["ffi", "lib"]
