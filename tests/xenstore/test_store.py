"""The simulated xenstored's data model: tree, paths, permissions, transactions, watches."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkpy.xenstore.store import Quota, Store, resolve_path
from blkpy.xenstore.wire import XenstoreError


@pytest.fixture
def store():
    return Store()


@pytest.fixture
def dom0(store):
    return store.open_session()


def guest(store, domid):
    session = store.open_session()
    store.declare_domid(session, domid)
    return session


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(XenstoreError) as info:
        fn(*args, **kwargs)
    return info.value.errno_name


# --- paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["", "/a/", "/a//b", "//", "/a b", "/a\0", "/é", "/a@b", "@other", "/" + "a" * 3072],
)
def test_invalid_paths(store, dom0, path):
    assert error_of(store.write, dom0, path, b"x") == "EINVAL"


def test_relative_paths_resolve_under_the_callers_home(store, dom0):
    assert resolve_path(dom0, "x/y") == "/local/domain/0/x/y"
    assert resolve_path(guest(store, 5), "device") == "/local/domain/5/device"
    assert resolve_path(dom0, "/") == "/"


def test_relative_length_limit_applies_to_unprivileged_domains(store, dom0):
    long_relative = "a" * 2049
    assert error_of(resolve_path, guest(store, 3), long_relative) == "EINVAL"
    assert resolve_path(dom0, long_relative).endswith(long_relative)


segment = st.text("abcXYZ019-_", min_size=1, max_size=8)
valid_paths = st.lists(segment, min_size=1, max_size=6).map(lambda s: "/" + "/".join(s))


@given(valid_paths)
def test_valid_paths_round_trip(path):
    store = Store()
    session = store.open_session()
    store.write(session, path, b"v")
    assert store.read(session, path) == b"v"


@given(st.text(max_size=30))
def test_path_validation_never_crashes(text):
    store = Store()
    session = store.open_session()
    try:
        store.write(session, text, b"v")
    except XenstoreError as err:
        assert err.errno_name in ("EINVAL", "ENOENT", "EACCES")
    else:
        assert store.read(session, text) == b"v"


# --- nodes ----------------------------------------------------------------------------


def test_write_creates_parents_with_empty_values(store, dom0):
    store.write(dom0, "/a/b/c", b"v")
    assert store.read(dom0, "/a/b") == b""
    assert store.directory(dom0, "/a") == ["b"]
    assert store.read(dom0, "/a/b/c") == b"v"


def test_values_are_binary(store, dom0):
    store.write(dom0, "/bin", b"\0\xff\n")
    assert store.read(dom0, "/bin") == b"\0\xff\n"


def test_read_missing_is_enoent(store, dom0):
    assert error_of(store.read, dom0, "/nope") == "ENOENT"
    assert error_of(store.directory, dom0, "/nope") == "ENOENT"


def test_mkdir_is_idempotent(store, dom0):
    store.mkdir(dom0, "/d")
    store.write(dom0, "/d", b"keep")
    store.mkdir(dom0, "/d")
    assert store.read(dom0, "/d") == b"keep"


def test_rm_is_recursive(store, dom0):
    store.write(dom0, "/t/a/b", b"1")
    store.write(dom0, "/t/c", b"2")
    store.rm(dom0, "/t/a")
    assert store.directory(dom0, "/t") == ["c"]
    assert error_of(store.read, dom0, "/t/a/b") == "ENOENT"


def test_rm_missing(store, dom0):
    store.mkdir(dom0, "/p")
    store.rm(dom0, "/p/gone")  # parent exists: fine
    assert error_of(store.rm, dom0, "/q/gone") == "ENOENT"
    assert error_of(store.rm, dom0, "/") == "EINVAL"


tree_ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "rm", "mkdir"]),
        st.lists(st.sampled_from("abc"), min_size=1, max_size=4),
    ),
    max_size=30,
)


def check_tree_invariants(store):
    nodes = store._nodes
    for path, node in nodes.items():
        if path != "/":
            parent = path.rsplit("/", 1)[0] or "/"
            assert path.rsplit("/", 1)[1] in nodes[parent].children
        for child in node.children:
            assert f"{path.rstrip('/')}/{child}" in nodes
        assert len(set(node.children)) == len(node.children)


@given(tree_ops)
def test_tree_matches_a_flat_model(ops):
    store = Store()
    session = store.open_session()
    model: dict[str, bytes] = {}
    for op, parts in ops:
        path = "/t/" + "/".join(parts)
        if op == "write":
            store.write(session, path, path.encode())
            for i in range(2, len(parts) + 1):
                model.setdefault("/t/" + "/".join(parts[: i - 1]), b"")
            model[path] = path.encode()
        elif op == "mkdir":
            store.mkdir(session, path)
            for i in range(1, len(parts) + 1):
                model.setdefault("/t/" + "/".join(parts[:i]), b"")
        elif "/t" in store._nodes and (path.rsplit("/", 1)[0] in model or len(parts) == 1):
            store.rm(session, path)
            model = {p: v for p, v in model.items() if p != path and not p.startswith(path + "/")}
    check_tree_invariants(store)
    stored = {p: n.value for p, n in store._nodes.items() if p.startswith("/t/")}
    assert stored == model


# --- permissions ----------------------------------------------------------------------


def test_unprivileged_cannot_read_dom0_nodes(store, dom0):
    store.write(dom0, "/backend/x", b"secret")
    domu = guest(store, 5)
    assert error_of(store.read, domu, "/backend/x") == "EACCES"
    assert error_of(store.read, domu, "/backend/missing") == "EACCES"  # no existence leak
    assert error_of(store.write, domu, "/backend/x", b"y") == "EACCES"


def test_read_grant_allows_reading_not_writing(store, dom0):
    store.write(dom0, "/backend/x", b"v")
    store.set_perms(dom0, "/backend", ["n0", "r5"])
    store.set_perms(dom0, "/backend/x", ["n0", "r5"])
    domu, other = guest(store, 5), guest(store, 6)
    assert store.read(domu, "/backend/x") == b"v"
    assert store.directory(domu, "/backend") == ["x"]
    assert error_of(store.read, domu, "/backend/missing") == "ENOENT"
    assert error_of(store.write, domu, "/backend/x", b"y") == "EACCES"
    assert error_of(store.read, other, "/backend/x") == "EACCES"


def test_default_access_in_entry_zero(store, dom0):
    store.write(dom0, "/pub", b"v")
    store.set_perms(dom0, "/pub", ["r0", "n7"])
    assert store.read(guest(store, 5), "/pub") == b"v"
    assert error_of(store.read, guest(store, 7), "/pub") == "EACCES"


def test_owner_has_full_access_and_children_inherit(store, dom0):
    store.mkdir(dom0, "/local/domain/5")
    store.set_perms(dom0, "/local/domain/5", ["n5", "r0"])
    domu = guest(store, 5)
    store.write(domu, "device/vbd/51712/state", b"1")
    assert store.get_perms(domu, "device/vbd/51712/state") == ["n5", "r0"]
    assert store.read(domu, "/local/domain/5/device/vbd/51712/state") == b"1"


def test_unprivileged_creator_becomes_owner(store, dom0):
    store.mkdir(dom0, "/shared")
    store.set_perms(dom0, "/shared", ["n0", "b5"])
    domu = guest(store, 5)
    store.write(domu, "/shared/mine", b"x")
    assert store.get_perms(dom0, "/shared/mine") == ["n5", "b5"]


def test_set_perms_rules(store, dom0):
    store.mkdir(dom0, "/local/domain/5")
    store.set_perms(dom0, "/local/domain/5", ["n5"])
    domu, other = guest(store, 5), guest(store, 6)
    store.set_perms(domu, "/local/domain/5", ["n5", "r6"])
    assert store.get_perms(other, "/local/domain/5") == ["n5", "r6"]
    assert error_of(store.set_perms, domu, "/local/domain/5", ["n6"]) == "EPERM"
    assert error_of(store.set_perms, other, "/local/domain/5", ["n6"]) == "EACCES"
    store.set_perms(dom0, "/local/domain/5", ["n6"])  # dom0 may change the owner
    for bad in ([], ["x1"], ["r"], ["r-1"], ["r99999"], ["r1x"]):
        assert error_of(store.set_perms, dom0, "/local/domain/5", bad) == "EINVAL"


# --- transactions ---------------------------------------------------------------------


def test_transaction_is_isolated_until_commit(store, dom0):
    other = store.open_session()
    tx = store.transaction_start(dom0)
    store.write(dom0, "/tx/a", b"1", tx)
    assert store.read(dom0, "/tx/a", tx) == b"1"
    assert error_of(store.read, other, "/tx/a") == "ENOENT"
    store.transaction_end(dom0, tx, commit=True)
    assert store.read(other, "/tx/a") == b"1"


def test_abort_discards(store, dom0):
    tx = store.transaction_start(dom0)
    store.write(dom0, "/tx/a", b"1", tx)
    store.transaction_end(dom0, tx, commit=False)
    assert error_of(store.read, dom0, "/tx/a") == "ENOENT"
    assert error_of(store.transaction_end, dom0, tx, True) == "ENOENT"
    assert error_of(store.read, dom0, "/", tx) == "ENOENT"


def test_conflict_on_a_node_read_in_the_transaction(store, dom0):
    other = store.open_session()
    store.write(dom0, "/c/state", b"1")
    tx = store.transaction_start(dom0)
    assert store.read(dom0, "/c/state", tx) == b"1"
    store.write(dom0, "/c/out", b"decided", tx)
    store.write(other, "/c/state", b"2")
    assert error_of(store.transaction_end, dom0, tx, True) == "EAGAIN"
    assert error_of(store.read, dom0, "/c/out") == "ENOENT"
    assert tx not in dom0.transactions


def test_conflict_when_a_read_missing_node_appears(store, dom0):
    tx = store.transaction_start(dom0)
    assert error_of(store.read, dom0, "/c/later", tx) == "ENOENT"
    store.write(store.open_session(), "/c/later", b"x")
    assert error_of(store.transaction_end, dom0, tx, True) == "EAGAIN"


def test_unrelated_changes_do_not_conflict(store, dom0):
    store.write(dom0, "/c/a", b"1")
    store.write(dom0, "/d/b", b"1")
    tx = store.transaction_start(dom0)
    store.read(dom0, "/c/a", tx)
    store.write(dom0, "/c/a", b"2", tx)
    store.write(store.open_session(), "/d/b", b"2")
    store.transaction_end(dom0, tx, commit=True)
    assert store.read(dom0, "/c/a") == b"2"


def test_rm_in_transaction(store, dom0):
    store.write(dom0, "/r/a/b", b"1")
    tx = store.transaction_start(dom0)
    store.rm(dom0, "/r/a", tx)
    assert store.read(dom0, "/r/a/b") == b"1"
    assert store.directory(dom0, "/r", tx) == []
    store.transaction_end(dom0, tx, commit=True)
    assert store.directory(dom0, "/r") == []
    check_tree_invariants(store)


@settings(max_examples=50)
@given(tree_ops)
def test_committed_transaction_equals_direct_application(ops):
    direct, transacted = Store(), Store()
    s1, s2 = direct.open_session(), transacted.open_session()
    tx = transacted.transaction_start(s2)
    for op, parts in ops:
        path = "/t/" + "/".join(parts)
        for store, session, txid in ((direct, s1, 0), (transacted, s2, tx)):
            args = (path, path.encode()) if op == "write" else (path,)
            try:
                getattr(store, op)(session, *args, tx_id=txid)
            except XenstoreError as err:
                outcome = err.errno_name
            else:
                outcome = "OK"
            if store is direct:
                expected = outcome
            else:
                assert outcome == expected
    transacted.transaction_end(s2, tx, commit=True)
    values = lambda s: {p: (n.value, n.children) for p, n in s._nodes.items()}  # noqa: E731
    assert values(direct) == values(transacted)
    check_tree_invariants(transacted)


# --- watches --------------------------------------------------------------------------


def test_watch_fires_initially_even_for_missing_nodes(store, dom0):
    store.watch(dom0, "/w/missing", "tok")
    assert dom0.take_events() == [("/w/missing", "tok")]
    assert error_of(store.watch, dom0, "/w/missing", "tok") == "EEXIST"
    store.watch(dom0, "/w/missing", "tok2")


def test_watch_fires_for_descendants_and_not_siblings(store, dom0):
    watcher = store.open_session()
    store.watch(watcher, "/w/dir", "t")
    watcher.take_events()
    store.write(dom0, "/w/dir/sub/key", b"1")
    store.write(dom0, "/w/dirx", b"1")
    store.write(dom0, "/w/other", b"1")
    assert watcher.take_events() == [("/w/dir/sub/key", "t")]


def test_removing_an_ancestor_fires_with_the_watch_path(store, dom0):
    watcher = store.open_session()
    store.write(dom0, "/w/a/b/c", b"1")
    store.watch(watcher, "/w/a/b/c", "deep")
    store.watch(watcher, "/w", "top")
    watcher.take_events()
    store.rm(dom0, "/w/a")
    assert sorted(watcher.take_events()) == [("/w/a", "top"), ("/w/a/b/c", "deep")]


def test_relative_watch_gets_relative_events(store, dom0):
    store.mkdir(dom0, "/local/domain/4")
    store.set_perms(dom0, "/local/domain/4", ["n4"])
    domu = guest(store, 4)
    store.watch(domu, "device", "t")
    assert domu.take_events() == [("device", "t")]
    store.write(dom0, "/local/domain/4/device/vbd", b"")
    assert domu.take_events() == [("device/vbd", "t")]


def test_identical_queued_events_coalesce(store, dom0):
    store.watch(dom0, "/w", "t")
    for value in (b"1", b"2", b"3"):
        store.write(dom0, "/w/x", value)
    store.write(dom0, "/w/y", b"1")
    assert dom0.take_events() == [("/w", "t"), ("/w/x", "t"), ("/w/y", "t")]


def test_transaction_events_fire_only_at_commit(store, dom0):
    watcher = store.open_session()
    store.watch(watcher, "/w", "t")
    watcher.take_events()
    tx = store.transaction_start(dom0)
    store.write(dom0, "/w/a", b"1", tx)
    assert watcher.take_events() == []
    store.transaction_end(dom0, tx, commit=True)
    assert watcher.take_events() == [("/w/a", "t")]
    tx = store.transaction_start(dom0)
    store.write(dom0, "/w/b", b"1", tx)
    store.transaction_end(dom0, tx, commit=False)
    assert watcher.take_events() == []


def test_events_need_read_access(store, dom0):
    domu = guest(store, 5)
    store.watch(domu, "/secret", "t")
    domu.take_events()
    store.write(dom0, "/secret/x", b"1")
    assert domu.take_events() == []
    store.set_perms(dom0, "/secret/x", ["n0", "r5"])
    assert domu.take_events() == [("/secret/x", "t")]


def test_unwatch_and_reset(store, dom0):
    store.watch(dom0, "/w", "t")
    store.unwatch(dom0, "/w", "t")
    assert error_of(store.unwatch, dom0, "/w", "t") == "ENOENT"
    store.watch(dom0, "/w", "t")
    store.transaction_start(dom0)
    store.reset_watches(dom0)
    dom0.take_events()
    store.write(dom0, "/w/x", b"")
    assert dom0.take_events() == [] and dom0.transactions == {}


def test_special_watches(store, dom0):
    domu_watcher = guest(store, 9)
    store.watch(dom0, "@releaseDomain", "rel")
    store.watch(dom0, "@introduceDomain", "intro")
    store.watch(domu_watcher, "@releaseDomain", "rel")
    assert error_of(store.watch, dom0, "@somethingElse", "x") == "EINVAL"
    dom0.take_events()
    domu_watcher.take_events()
    store.write(dom0, "/unrelated", b"")
    store.introduce_domain(3)
    assert store.is_domain_introduced(3)
    store.release_domain(3)
    assert not store.is_domain_introduced(3)
    assert dom0.take_events() == [("@introduceDomain", "intro"), ("@releaseDomain", "rel")]
    assert domu_watcher.take_events() == []  # @releaseDomain is n0 by default
    store.set_perms(dom0, "@releaseDomain", ["n0", "r9"])
    assert store.get_perms(domu_watcher, "@releaseDomain") == ["n0", "r9"]
    store.release_domain(3)
    assert domu_watcher.take_events() == [("@releaseDomain", "rel")]


def test_closing_a_declared_session_releases_its_domain(store, dom0):
    store.watch(dom0, "@releaseDomain", "rel")
    dom0.take_events()
    domu = guest(store, 12)
    assert store.is_domain_introduced(12)
    store.close_session(domu)
    assert not store.is_domain_introduced(12)
    assert dom0.take_events() == [("@releaseDomain", "rel")]
    store.close_session(store.open_session())  # an undeclared dom0 connection: nothing
    assert dom0.take_events() == []


# --- quotas ---------------------------------------------------------------------------


def test_quotas_for_unprivileged_domains():
    store = Store(Quota(nodes=5, watches=2, transactions=1, value_size=8, perms=2))
    dom0 = store.open_session()
    store.mkdir(dom0, "/local/domain/5")
    store.set_perms(dom0, "/local/domain/5", ["n5"])
    domu = guest(store, 5)
    store.watch(domu, "a", "1")
    store.watch(domu, "b", "2")
    assert error_of(store.watch, domu, "c", "3") == "E2BIG"
    store.transaction_start(domu)
    assert error_of(store.transaction_start, domu) == "ENOSPC"
    assert error_of(store.write, domu, "v", b"123456789") == "E2BIG"
    assert error_of(store.set_perms, domu, "/local/domain/5", ["n5", "r1", "r2"]) == "ENOSPC"
    for i in range(4):  # owns /local/domain/5 already: 5 in all
        store.write(domu, f"n{i}", b"")
    assert error_of(store.write, domu, "one-too-many", b"") == "ENOSPC"
    store.rm(domu, "n0")
    store.write(domu, "fits-again", b"")
    # dom0 is not limited
    for i in range(10):
        store.watch(dom0, f"/w{i}", "t")
    store.write(dom0, "/big", b"x" * 4000)


def test_transaction_size_quota():
    store = Store(Quota(transaction_nodes=3))
    dom0 = store.open_session()
    store.mkdir(dom0, "/local/domain/5")
    store.set_perms(dom0, "/local/domain/5", ["n5"])
    domu = guest(store, 5)
    tx = store.transaction_start(domu)
    store.write(domu, "a", b"", tx)  # touches a and its parent
    store.write(domu, "b", b"", tx)
    assert error_of(store.write, domu, "c", b"", tx) == "ENOSPC"
    tx = store.transaction_start(dom0)
    for name in "abcdefgh":
        store.write(dom0, f"/q/{name}", b"", tx)  # dom0 is not limited
