"""Stands in for `blkpy serve` under the watcher: records its arguments in $FAKE_SERVE_DIR,
then waits for SIGTERM (recorded too) or for the file `<dir>/exit-<pid>` to appear."""

import os
import signal
import sys
import time
from pathlib import Path

out = Path(os.environ["FAKE_SERVE_DIR"])
me = out / f"started-{os.getpid()}"
me.write_text("\n".join(sys.argv[1:]))


def on_term(*_):
    (out / f"terminated-{os.getpid()}").write_text("")
    sys.exit(0)


signal.signal(signal.SIGTERM, on_term)
while not (out / f"exit-{os.getpid()}").exists():
    time.sleep(0.05)
