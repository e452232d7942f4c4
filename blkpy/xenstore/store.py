"""The data model of the simulated xenstored, sans-IO.

A tree of nodes (value bytes, permission list, children), sessions (one per client
connection: its domain, watches and open transactions), optimistic transactions and watch
events. The daemon (``blkpy.xenstore.daemon``) turns wire messages into calls on a Store;
this module never sees bytes of the wire.

Semantics follow C xenstored 4.17 where the spec pins them down. Deliberate choices:
- Permission checks of a missing node: if the nearest existing ancestor is not readable the
  answer is EACCES (do not reveal what exists), else ENOENT. Creating a node needs write
  access to the nearest existing ancestor.
- A transaction conflicts (EAGAIN at commit) when any node it looked at or changed was changed
  by someone else since; C is a little laxer (blind overwrites do not conflict). Clients must
  retry on EAGAIN either way.
- Domain release does not delete the domain's nodes (the toolstack removes them).
"""

from __future__ import annotations

import collections
import dataclasses
import string

from blkpy.xenstore.wire import ABS_PATH_MAX, REL_PATH_MAX, XenstoreError

INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"
SPECIAL_PATHS = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)

READ = 1
WRITE = 2
_ACCESS_BY_LETTER = {"n": 0, "r": READ, "w": WRITE, "b": READ | WRITE}
_LETTER_BY_ACCESS = {access: letter for letter, access in _ACCESS_BY_LETTER.items()}
_PATH_CHARS = frozenset(string.ascii_letters + string.digits + "-/_@")
#: Domain ids 0x7FF0 and above are reserved (DOMID_FIRST_RESERVED).
DOMID_MAX = 0x7FEF


def parse_domid(text: str | bytes) -> int:
    """A decimal domid in 0..DOMID_MAX, else EINVAL."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if not text.isascii() or not text.isdigit() or len(text) > 5 or int(text) > DOMID_MAX:
        raise XenstoreError("EINVAL", f"bad domid {text!r}")
    return int(text)


@dataclasses.dataclass(frozen=True)
class Perm:
    """One entry of a permission list: ``domid`` gets ``access`` (READ|WRITE bits)."""

    domid: int
    access: int

    @classmethod
    def parse(cls, text: str) -> Perm:
        if not text or text[0] not in _ACCESS_BY_LETTER:
            raise XenstoreError("EINVAL", f"bad permission {text!r}")
        return cls(parse_domid(text[1:]), _ACCESS_BY_LETTER[text[0]])

    def __str__(self) -> str:
        return f"{_LETTER_BY_ACCESS[self.access]}{self.domid}"


Perms = tuple[Perm, ...]
DOM0_ONLY: Perms = (Perm(0, 0),)


@dataclasses.dataclass(frozen=True)
class Node:
    value: bytes
    #: entry 0: owner (full access) and default access for unlisted domains
    perms: Perms
    children: tuple[str, ...] = ()
    #: changes on every modification; transactions compare it at commit
    generation: int = 0

    @property
    def owner(self) -> int:
        return self.perms[0].domid


@dataclasses.dataclass(frozen=True)
class Quota:
    """Limits for unprivileged domains (C xenstored 4.17 defaults)."""

    nodes: int = 1000
    watches: int = 128
    transactions: int = 10
    value_size: int = 2048
    perms: int = 5
    transaction_nodes: int = 1024


@dataclasses.dataclass(frozen=True)
class Watch:
    given_path: str  # as the client sent it (relative stays relative in events)
    path: str  # absolute, or a special @ name
    token: str


@dataclasses.dataclass
class Transaction:
    #: the transaction's private changes: path -> new node, or None when deleted
    overlay: dict[str, Node | None] = dataclasses.field(default_factory=dict)
    #: generation of every live node the transaction touched (None: it was absent)
    accessed: dict[str, int | None] = dataclasses.field(default_factory=dict)
    #: changes to announce to watchers at commit
    changes: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    owned_delta: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)


class Session:
    """What the store keeps per client connection."""

    def __init__(self, domid: int = 0) -> None:
        self.domid = domid
        #: set when the connection declared its domid (simulated guest)
        self.declared = False
        self.watches: dict[tuple[str, str], Watch] = {}
        self.transactions: dict[int, Transaction] = {}
        self._next_tx_id = 1
        self._events: list[tuple[str, str]] = []

    @property
    def privileged(self) -> bool:
        return self.domid == 0

    @property
    def home(self) -> str:
        return f"/local/domain/{self.domid}"

    def queue_event(self, path: str, token: str) -> None:
        # An event identical to one still queued is dropped (except @ paths): a watch says
        # "something changed", the client re-reads anyway.
        event = (path, token)
        if path.startswith("@") or event not in self._events:
            self._events.append(event)

    def has_events(self) -> bool:
        return bool(self._events)

    def take_events(self) -> list[tuple[str, str]]:
        events, self._events = self._events, []
        return events

    def allocate_tx_id(self) -> int:
        while self._next_tx_id == 0 or self._next_tx_id in self.transactions:
            self._next_tx_id = (self._next_tx_id + 1) & 0xFFFFFFFF
        tx_id = self._next_tx_id
        self._next_tx_id = (tx_id + 1) & 0xFFFFFFFF
        return tx_id


def access_for(session: Session, perms: Perms) -> int:
    """READ|WRITE bits ``session`` has on a node with ``perms``."""
    if session.privileged or perms[0].domid == session.domid:
        return READ | WRITE
    for perm in perms[1:]:
        if perm.domid == session.domid:
            return perm.access
    return perms[0].access


def parent_of(path: str) -> str:
    parent = path.rsplit("/", 1)[0]
    return parent or "/"


def is_ancestor_or_self(ancestor: str, path: str) -> bool:
    if ancestor == "/" or ancestor == path:
        return True
    return path.startswith(ancestor + "/")


def resolve_path(session: Session, path: str, allow_special: bool = False) -> str:
    """The absolute form of a client's path, or EINVAL if it is malformed."""
    if allow_special and path.startswith("@"):
        if path not in SPECIAL_PATHS:
            raise XenstoreError("EINVAL", f"unknown special path {path!r}")
        return path
    if not path or not set(path) <= _PATH_CHARS or "@" in path:
        raise XenstoreError("EINVAL", f"bad path {path!r}")
    relative = path
    if not path.startswith("/"):
        path = f"{session.home}/{path}"
    elif path.startswith(session.home + "/"):
        relative = path[len(session.home) + 1 :]
    if "//" in path or (path.endswith("/") and path != "/"):
        raise XenstoreError("EINVAL", f"bad path {path!r}")
    if len(path) > ABS_PATH_MAX or (not session.privileged and len(relative) > REL_PATH_MAX):
        raise XenstoreError("EINVAL", f"path of {len(path)} bytes too long")
    return path


class _LiveView:
    """Reads and writes the store's committed tree."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def get(self, path: str) -> Node | None:
        return self._store._nodes.get(path)

    def put(self, path: str, node: Node) -> None:
        store = self._store
        old = store._nodes.get(path)
        if old is not None:
            store._owned[old.owner] -= 1
        store._generation += 1
        store._nodes[path] = dataclasses.replace(node, generation=store._generation)
        store._owned[node.owner] += 1

    def delete(self, path: str) -> None:
        old = self._store._nodes.pop(path, None)
        if old is not None:
            self._store._owned[old.owner] -= 1

    def owned(self, domid: int) -> int:
        return self._store._owned[domid]

    def changed(self, kind: str, path: str) -> None:
        self._store._fire(kind, path)


class _TransactionView:
    """Reads through a transaction's overlay; records what it touched; writes privately."""

    def __init__(self, store: Store, tx: Transaction) -> None:
        self._store = store
        self._tx = tx

    def get(self, path: str) -> Node | None:
        if path in self._tx.overlay:
            return self._tx.overlay[path]
        node = self._store._nodes.get(path)
        self._tx.accessed.setdefault(path, None if node is None else node.generation)
        return node

    def put(self, path: str, node: Node) -> None:
        old = self.get(path)
        if old is not None:
            self._tx.owned_delta[old.owner] -= 1
        self._tx.overlay[path] = node
        self._tx.owned_delta[node.owner] += 1

    def delete(self, path: str) -> None:
        old = self.get(path)
        if old is not None:
            self._tx.owned_delta[old.owner] -= 1
        self._tx.overlay[path] = None

    def owned(self, domid: int) -> int:
        return self._store._owned[domid] + self._tx.owned_delta[domid]

    def changed(self, kind: str, path: str) -> None:
        self._tx.changes.append((kind, path))

    @property
    def nodes_changed(self) -> int:
        return len(self._tx.overlay)


_View = _LiveView | _TransactionView


class Store:
    """The simulated xenstored's state. Every public method takes the calling session;
    errors are raised as XenstoreError with the name the daemon puts on the wire."""

    def __init__(self, quota: Quota | None = None) -> None:
        self.quota = quota or Quota()
        self._nodes: dict[str, Node] = {}
        self._owned: collections.Counter[int] = collections.Counter()
        self._generation = 0
        self._sessions: list[Session] = []
        self._special_perms: dict[str, Perms] = dict.fromkeys(SPECIAL_PATHS, DOM0_ONLY)
        self._introduced: set[int] = {0}
        live = _LiveView(self)
        live.put("/", Node(b"", DOM0_ONLY))
        for path in ("/local", "/local/domain", "/tool"):
            self._add(live, path, Node(b"", DOM0_ONLY))

    # --- sessions -------------------------------------------------------------------

    def open_session(self, domid: int = 0) -> Session:
        session = Session(domid)
        self._sessions.append(session)
        return session

    def declare_domid(self, session: Session, domid: int) -> None:
        """The connection says it is domain ``domid`` (a simulated guest)."""
        session.domid = domid
        session.declared = True

    def close_session(self, session: Session) -> None:
        """Drop the session's watches and transactions; a declared guest's departure fires
        @releaseDomain so that backends notice a dead simulated guest."""
        if session in self._sessions:
            self._sessions.remove(session)
        session.watches.clear()
        session.transactions.clear()
        if session.declared and not session.privileged:
            self.release_domain(session.domid)

    # --- nodes ----------------------------------------------------------------------

    def read(self, session: Session, path: str, tx_id: int = 0) -> bytes:
        view = self._view(session, tx_id)
        return self._get(view, session, resolve_path(session, path), READ).value

    def write(self, session: Session, path: str, value: bytes, tx_id: int = 0) -> None:
        view = self._view(session, tx_id)
        path = resolve_path(session, path)
        if not session.privileged and len(value) > self.quota.value_size:
            raise XenstoreError("E2BIG", f"value of {len(value)} bytes")
        node = view.get(path)
        if node is None:
            self._create(view, session, path, value)
        else:
            self._check_access(session, node, WRITE, path)
            self._put(view, session, path, dataclasses.replace(node, value=value))
        view.changed("write", path)

    def mkdir(self, session: Session, path: str, tx_id: int = 0) -> None:
        view = self._view(session, tx_id)
        path = resolve_path(session, path)
        node = view.get(path)
        if node is not None:
            self._check_access(session, node, WRITE, path)
            return
        self._create(view, session, path, b"")
        view.changed("write", path)

    def rm(self, session: Session, path: str, tx_id: int = 0) -> None:
        view = self._view(session, tx_id)
        path = resolve_path(session, path)
        node = view.get(path)
        if node is None:
            # Removing a missing node is fine while its parent exists.
            if path != "/" and view.get(parent_of(path)) is not None:
                self._get(view, session, parent_of(path), READ)
                return
            raise self._missing(view, session, path)
        self._check_access(session, node, WRITE, path)
        if path == "/":
            raise XenstoreError("EINVAL", "cannot remove /")
        self._delete_tree(view, path, node)
        parent_path = parent_of(path)
        parent = view.get(parent_path)
        assert parent is not None  # parents of existing nodes exist
        name = path.rsplit("/", 1)[1]
        children = tuple(child for child in parent.children if child != name)
        self._put(view, session, parent_path, dataclasses.replace(parent, children=children))
        view.changed("rm", path)

    def directory(self, session: Session, path: str, tx_id: int = 0) -> list[str]:
        view = self._view(session, tx_id)
        return list(self._get(view, session, resolve_path(session, path), READ).children)

    def generation(self, session: Session, path: str, tx_id: int = 0) -> int:
        """The node's generation count (DIRECTORY_PART lets clients compare it)."""
        view = self._view(session, tx_id)
        return self._get(view, session, resolve_path(session, path), READ).generation

    def get_perms(self, session: Session, path: str, tx_id: int = 0) -> list[str]:
        path = resolve_path(session, path, allow_special=True)
        if path in self._special_perms:
            perms = self._special_perms[path]
            if not access_for(session, perms) & READ:
                raise XenstoreError("EACCES", path)
        else:
            perms = self._get(self._view(session, tx_id), session, path, READ).perms
        return [str(perm) for perm in perms]

    def set_perms(self, session: Session, path: str, perms: list[str], tx_id: int = 0) -> None:
        parsed = tuple(Perm.parse(text) for text in perms)
        if not parsed:
            raise XenstoreError("EINVAL", "empty permission list")
        if not session.privileged and len(parsed) > self.quota.perms:
            raise XenstoreError("ENOSPC", f"{len(parsed)} permissions")
        path = resolve_path(session, path, allow_special=True)
        if path in self._special_perms:
            if not session.privileged:
                raise XenstoreError("EACCES", path)
            self._special_perms[path] = parsed
            return
        view = self._view(session, tx_id)
        node = self._get(view, session, path, WRITE)
        if not session.privileged:
            if node.owner != session.domid:
                raise XenstoreError("EACCES", f"{path}: not the owner")
            if parsed[0].domid != node.owner:
                raise XenstoreError("EPERM", f"{path}: only dom0 may change the owner")
        self._put(view, session, path, dataclasses.replace(node, perms=parsed))
        view.changed("write", path)

    # --- watches --------------------------------------------------------------------

    def watch(self, session: Session, path: str, token: str) -> None:
        """Register a watch and queue its initial event."""
        watch = Watch(path, resolve_path(session, path, allow_special=True), token)
        key = (watch.path, token)
        if key in session.watches:
            raise XenstoreError("EEXIST", f"watch {path} {token}")
        if not session.privileged and len(session.watches) >= self.quota.watches:
            raise XenstoreError("E2BIG", "too many watches")
        session.watches[key] = watch
        session.queue_event(path, token)

    def unwatch(self, session: Session, path: str, token: str) -> None:
        key = (resolve_path(session, path, allow_special=True), token)
        if session.watches.pop(key, None) is None:
            raise XenstoreError("ENOENT", f"no watch {path} {token}")

    def reset_watches(self, session: Session) -> None:
        """Drop all watches and transactions of the session."""
        session.watches.clear()
        session.transactions.clear()

    # --- transactions ---------------------------------------------------------------

    def transaction_start(self, session: Session) -> int:
        if not session.privileged and len(session.transactions) >= self.quota.transactions:
            raise XenstoreError("ENOSPC", "too many transactions")
        tx_id = session.allocate_tx_id()
        session.transactions[tx_id] = Transaction()
        return tx_id

    def transaction_end(self, session: Session, tx_id: int, commit: bool) -> None:
        """Commit (EAGAIN if anything the transaction touched changed since) or abort."""
        tx = session.transactions.pop(tx_id, None)
        if tx is None:
            raise XenstoreError("ENOENT", f"no transaction {tx_id}")
        if not commit:
            return
        for path, generation in tx.accessed.items():
            node = self._nodes.get(path)
            if (None if node is None else node.generation) != generation:
                raise XenstoreError("EAGAIN", f"transaction {tx_id} conflicts at {path}")
        live = _LiveView(self)
        for path, node in tx.overlay.items():
            if node is None:
                live.delete(path)
            else:
                live.put(path, node)
        for kind, path in tx.changes:
            self._fire(kind, path)

    # --- domains --------------------------------------------------------------------

    @staticmethod
    def get_domain_path(domid: int) -> str:
        return f"/local/domain/{domid}"

    def introduce_domain(self, domid: int) -> None:
        self._introduced.add(domid)
        self._fire_special(INTRODUCE_DOMAIN)

    def release_domain(self, domid: int) -> None:
        self._introduced.discard(domid)
        self._fire_special(RELEASE_DOMAIN)

    def is_domain_introduced(self, domid: int) -> bool:
        return domid in self._introduced or any(
            s.declared and s.domid == domid for s in self._sessions
        )

    # --- internals ------------------------------------------------------------------

    def _view(self, session: Session, tx_id: int) -> _View:
        if tx_id == 0:
            return _LiveView(self)
        tx = session.transactions.get(tx_id)
        if tx is None:
            raise XenstoreError("ENOENT", f"no transaction {tx_id}")
        return _TransactionView(self, tx)

    @staticmethod
    def _check_access(session: Session, node: Node, need: int, path: str) -> None:
        if access_for(session, node.perms) & need != need:
            raise XenstoreError("EACCES", path)

    def _get(self, view: _View, session: Session, path: str, need: int) -> Node:
        node = view.get(path)
        if node is None:
            raise self._missing(view, session, path)
        self._check_access(session, node, need, path)
        return node

    def _missing(self, view: _View, session: Session, path: str) -> XenstoreError:
        """ENOENT, or EACCES if the caller may not even read the nearest existing ancestor."""
        ancestor = path
        while (node := view.get(ancestor)) is None:
            ancestor = parent_of(ancestor)
        if not access_for(session, node.perms) & READ:
            return XenstoreError("EACCES", path)
        return XenstoreError("ENOENT", path)

    def _create(self, view: _View, session: Session, path: str, value: bytes) -> None:
        """Create ``path`` and any missing parents, inheriting the nearest parent's perms."""
        missing = []
        ancestor = path
        while (node := view.get(ancestor)) is None:
            missing.append(ancestor)
            ancestor = parent_of(ancestor)
        if not access_for(session, node.perms) & WRITE:
            raise XenstoreError("EACCES", path)
        perms = node.perms
        if not session.privileged:
            # An unprivileged creator becomes the owner of what it creates.
            perms = (Perm(session.domid, perms[0].access), *perms[1:])
            if view.owned(session.domid) + len(missing) > self.quota.nodes:
                raise XenstoreError("ENOSPC", "node quota exceeded")
        for created in reversed(missing):
            self._add(view, created, Node(value if created == path else b"", perms))
        self._check_transaction_size(view, session)

    def _add(self, view: _View, path: str, node: Node) -> None:
        parent_path = parent_of(path)
        parent = view.get(parent_path)
        assert parent is not None
        name = path.rsplit("/", 1)[1]
        view.put(parent_path, dataclasses.replace(parent, children=(*parent.children, name)))
        view.put(path, node)

    def _put(self, view: _View, session: Session, path: str, node: Node) -> None:
        view.put(path, node)
        self._check_transaction_size(view, session)

    def _check_transaction_size(self, view: _View, session: Session) -> None:
        if (
            isinstance(view, _TransactionView)
            and not session.privileged
            and view.nodes_changed > self.quota.transaction_nodes
        ):
            raise XenstoreError("ENOSPC", "transaction touches too many nodes")

    def _delete_tree(self, view: _View, path: str, node: Node) -> None:
        for child in node.children:
            child_path = f"{path.rstrip('/')}/{child}"
            child_node = view.get(child_path)
            if child_node is not None:
                self._delete_tree(view, child_path, child_node)
        view.delete(path)

    def _fire(self, kind: str, path: str) -> None:
        """Queue the events a committed change of ``path`` causes.

        A change fires every watch on ``path`` or an ancestor; removing ``path`` also
        fires every watch below it, with the watch's own path."""
        node = self._nodes.get(path)
        for session in self._sessions:
            for watch in session.watches.values():
                if watch.path.startswith("@"):
                    continue
                if is_ancestor_or_self(watch.path, path):
                    if (
                        kind == "write"
                        and node is not None
                        and not (access_for(session, node.perms) & READ)
                    ):
                        continue
                    session.queue_event(self._event_path(session, watch, path), watch.token)
                elif kind == "rm" and is_ancestor_or_self(path, watch.path):
                    session.queue_event(watch.given_path, watch.token)

    @staticmethod
    def _event_path(session: Session, watch: Watch, path: str) -> str:
        """A relative watch gets relative event paths."""
        if watch.given_path.startswith("/"):
            return path
        return path[len(session.home) + 1 :]

    def _fire_special(self, name: str) -> None:
        for session in self._sessions:
            if not access_for(session, self._special_perms[name]) & READ:
                continue
            for watch in session.watches.values():
                if watch.path == name:
                    session.queue_event(name, watch.token)
