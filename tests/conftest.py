import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def raw_image(tmp_path):
    """A 4 MiB sparse raw image."""
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    return str(path)

