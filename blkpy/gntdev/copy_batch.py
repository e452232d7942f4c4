"""The checks every platform applies to a grant-copy batch before running it."""

from __future__ import annotations

import errno

import numpy as np

from blkpy.platform import COPY_SEGMENT_DTYPE, PlatformError


def check_copy_batch(segments: np.ndarray) -> None:
    """Raise PlatformError unless ``segments`` is a batch the platform can fill in place."""
    if not isinstance(segments, np.ndarray) or segments.dtype != COPY_SEGMENT_DTYPE:
        raise PlatformError(errno.EINVAL, "grant copy wants a COPY_SEGMENT_DTYPE array")
    if segments.ndim != 1 or not segments.flags.c_contiguous or not segments.flags.writeable:
        raise PlatformError(errno.EINVAL, "grant copy segments must be 1-d, contiguous, writable")
