"""xenstore: the wire protocol, a client, and the simulated xenstored.

Backends and the simulated frontend use ``XenstoreClient``; errors are ``XenstoreError``
(``.errno_name`` like 'EACCES') and its subclass ``NoEntry`` for ENOENT.
"""

from blkpy.xenstore.client import XenstoreClient
from blkpy.xenstore.wire import NoEntry, XenstoreError

__all__ = ["NoEntry", "XenstoreClient", "XenstoreError"]
