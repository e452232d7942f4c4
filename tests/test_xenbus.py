"""The backend XenbusState machine, transition by transition (no xenstore involved)."""

import pytest

from blkpy.xenbus import (
    BackendStateMachine,
    Connect,
    Disconnect,
    Exit,
    Fatal,
    PublishFeatures,
    Snapshot,
    SwitchState,
    XenbusState,
    parse_state,
)

S = XenbusState


def snap(fe, be=None, online=True, exists=True):
    return Snapshot(fe, be, online, exists)


def connected_machine():
    m = BackendStateMachine()
    m.start()
    assert m.on_change(snap(S.INITIALISED, S.INIT_WAIT)) == [Connect()]
    assert m.connected() == [SwitchState(S.CONNECTED)]
    return m


def test_probe_publishes_features_before_initwait():
    m = BackendStateMachine()
    assert m.start() == [PublishFeatures(), SwitchState(S.INIT_WAIT)]


@pytest.mark.parametrize("fe", [S.INITIALISED, S.CONNECTED])
def test_frontend_initialised_or_connected_triggers_connect(fe):
    m = BackendStateMachine()
    m.start()
    assert m.on_change(snap(fe, S.INIT_WAIT)) == [Connect()]


def test_no_reconnect_while_connected():
    m = connected_machine()
    assert m.on_change(snap(S.CONNECTED, S.CONNECTED)) == []


def test_frontend_initialising_or_initwait_waits():
    m = BackendStateMachine()
    m.start()
    assert m.on_change(snap(S.INITIALISING, S.INIT_WAIT)) == []
    assert m.on_change(snap(S.INIT_WAIT, S.INIT_WAIT)) == []


def test_guest_close_and_reconnect_with_online():
    m = connected_machine()
    assert m.on_change(snap(S.CLOSING, S.CONNECTED)) == [SwitchState(S.CLOSING)]
    assert m.on_change(snap(S.CLOSED, S.CLOSING)) == [Disconnect(), SwitchState(S.CLOSED)]
    # online=1: stay for a reconnect; the frontend re-initialises
    assert m.on_change(snap(S.INITIALISING, S.CLOSED)) == [SwitchState(S.INIT_WAIT)]
    assert m.on_change(snap(S.INITIALISED, S.INIT_WAIT)) == [Connect()]
    assert m.connected() == [SwitchState(S.CONNECTED)]


def test_frontend_closed_with_online_zero_exits():
    m = connected_machine()
    m.on_change(snap(S.CLOSING, S.CONNECTED, online=False))
    acts = m.on_change(snap(S.CLOSED, S.CLOSING, online=False))
    assert acts == [Disconnect(), SwitchState(S.CLOSED), Exit()]
    assert m.finished and m.on_change(snap(S.CLOSED, S.CLOSED, online=False)) == []


def test_toolstack_removal_with_live_frontend():
    m = connected_machine()
    # libxl writes online=0 and our state=Closing; the frontend is still Connected.
    assert m.on_change(snap(S.CONNECTED, S.CLOSING, online=False)) == []
    assert m.on_change(snap(S.CLOSED, S.CLOSING, online=False)) == [
        Disconnect(), SwitchState(S.CLOSED), Exit()]


def test_toolstack_removal_with_dead_frontend_closes_at_once():
    m = connected_machine()
    acts = m.on_change(snap(S.INITIALISING, S.CLOSING, online=False))
    assert acts == [Disconnect(), SwitchState(S.CLOSED), Exit()]


def test_frontend_vanishing_unregisters():
    m = connected_machine()
    assert m.on_change(snap(None, S.CONNECTED)) == [Disconnect(), SwitchState(S.CLOSED), Exit()]


@pytest.mark.parametrize("raw", ["x", "", "99", "-1"])
def test_garbage_frontend_state_unregisters_leaving_closed(raw):
    """Regression (fuzz handshake): a frontend writing garbage to its state node made the
    backend unregister while its own state node still said Connected, so a later toolstack
    removal waited 10 s for a Closed nobody would write."""
    m = connected_machine()
    assert m.on_change(snap(parse_state(raw), S.CONNECTED)) == [
        Disconnect(), SwitchState(S.CLOSED), Exit()]
    assert m.state == S.CLOSED


def test_backend_dir_removed_exits():
    m = connected_machine()
    assert m.on_change(snap(S.CONNECTED, None, exists=False)) == [Disconnect(), Exit()]


def test_unexpected_frontend_state_is_fatal():
    m = connected_machine()
    acts = m.on_change(snap(S.RECONFIGURING, S.CONNECTED))
    assert acts[0] == Disconnect() and isinstance(acts[1], Fatal)
    assert acts[2] == SwitchState(S.CLOSING)


def test_connect_failure_goes_closing():
    m = BackendStateMachine()
    m.start()
    m.on_change(snap(S.INITIALISED, S.INIT_WAIT))
    acts = m.failed("bad ring-ref")
    assert acts == [Fatal("bad ring-ref"), SwitchState(S.CLOSING)]
    # no reconnect attempt while we are closing
    assert m.on_change(snap(S.INITIALISED, S.CLOSING)) == []


def test_frontend_going_straight_to_initialised_after_close():
    m = connected_machine()
    m.on_change(snap(S.CLOSED, S.CONNECTED))
    assert m.state == S.CLOSED
    assert m.on_change(snap(S.INITIALISED, S.CLOSED)) == [Connect()]


@pytest.mark.parametrize("raw,expected", [
    (None, None), ("4", S.CONNECTED), (" 6\n", S.CLOSED), ("x", S.UNKNOWN), ("99", S.UNKNOWN),
    ("", S.UNKNOWN), ("-1", S.UNKNOWN),
])
def test_parse_state_is_total(raw, expected):
    assert parse_state(raw) == expected
