"""The connection state table (supervisor.http.connection): complete, closed under its
moves, and enforced."""
from __future__ import annotations

import socket

import pytest

from supervisor.http import connection
from supervisor.http.connection import (
    BUSY,
    CLOSED,
    HANDED_BACK,
    IDLE,
    PROXY,
    READING,
    TRANSITIONS,
    ClientConnection,
    IllegalTransition,
    State,
)
from supervisor.http.protocol import Connection
from supervisor.http.wsgi import EnvironBuilder

ALL_STATES = {value for value in vars(connection).values() if isinstance(value, State)}
INITIAL = {IDLE, PROXY}   # what a new connection starts in
FINAL = {CLOSED, HANDED_BACK}


@pytest.fixture
def conn():
    a, b = socket.socketpair()
    yield lambda state: ClientConnection(a, ("192.0.2.1", 1), EnvironBuilder(server_name="h", server_port="80"),
                                         Connection(), 30.0, state, lambda conn: None)
    a.close()
    b.close()


def test_every_state_is_in_the_table_and_every_move_leads_into_it():
    assert set(TRANSITIONS) == ALL_STATES
    for state, targets in TRANSITIONS.items():
        assert targets <= ALL_STATES, state
        assert state.next == targets   # what move() reads


def test_final_states_have_no_way_out_and_every_other_state_leads_to_one():
    assert {state for state, targets in TRANSITIONS.items() if not targets} == FINAL
    for state in ALL_STATES - FINAL:
        assert CLOSED in TRANSITIONS[state], f"{state} cannot be closed"


def test_every_state_is_reachable_from_a_new_connection():
    seen, todo = set(INITIAL), list(INITIAL)
    while todo:
        for target in TRANSITIONS[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    assert seen == ALL_STATES


def test_the_keep_alive_path_is_two_moves(conn):
    c = conn(IDLE)
    c.move(BUSY)
    c.move(IDLE)
    c.move(READING)
    c.move(BUSY)
    c.move(CLOSED)
    assert c.state is CLOSED


@pytest.mark.parametrize("old, new", [
    (old, new) for old in sorted(ALL_STATES, key=repr) for new in sorted(ALL_STATES, key=repr)
    if new not in TRANSITIONS[old]])
def test_a_move_the_table_does_not_list_raises_and_changes_nothing(conn, old, new):
    c = conn(old)
    with pytest.raises(IllegalTransition) as info:
        c.move(new)
    assert c.state is old
    assert (info.value.old, info.value.new) == (old, new)
    assert str(info.value) == f"a connection cannot move from {old!r} to {new!r}"
