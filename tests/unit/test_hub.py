"""Pure tests of ``wsnode.hub``: plain connection objects in, lookups and first/last flags out."""

from __future__ import annotations

from dataclasses import dataclass

from wsnode.hub import Hub


@dataclass(eq=False)
class Conn:
    conn_id: str
    user_id: str


def hub_with(*conns: Conn) -> Hub:
    hub = Hub()
    for conn in conns:
        hub.add(conn)
    return hub


def test_adding_a_users_first_connection_returns_true():
    assert Hub().add(Conn("c1", "alice")) is True


def test_adding_a_users_second_connection_returns_false():
    hub = hub_with(Conn("c1", "alice"))

    assert hub.add(Conn("c2", "alice")) is False


def test_another_users_first_connection_returns_true():
    hub = hub_with(Conn("c1", "alice"))

    assert hub.add(Conn("c2", "bob")) is True


def test_removing_a_users_last_connection_returns_true():
    conn = Conn("c1", "alice")
    hub = hub_with(conn)

    assert hub.remove(conn) is True


def test_removing_one_of_two_connections_returns_false():
    first = Conn("c1", "alice")
    hub = hub_with(first, Conn("c2", "alice"))

    assert hub.remove(first) is False


def test_removing_the_second_of_two_connections_returns_true():
    first, second = Conn("c1", "alice"), Conn("c2", "alice")
    hub = hub_with(first, second)
    hub.remove(first)

    assert hub.remove(second) is True


def test_removing_an_unknown_connection_returns_false():
    hub = hub_with(Conn("c1", "alice"))

    assert hub.remove(Conn("c9", "alice")) is False


def test_removing_a_connection_twice_returns_false_the_second_time():
    conn = Conn("c1", "alice")
    hub = hub_with(conn)
    hub.remove(conn)

    assert hub.remove(conn) is False


def test_removing_an_unknown_connection_leaves_the_others_in_place():
    conn = Conn("c1", "alice")
    hub = hub_with(conn)
    hub.remove(Conn("c9", "alice"))

    assert hub.of_user("alice") == [conn]


def test_a_user_may_hold_several_connections():
    first, second = Conn("c1", "alice"), Conn("c2", "alice")
    hub = hub_with(first, second, Conn("c3", "bob"))

    assert hub.of_user("alice") == [first, second]


def test_of_user_for_a_user_without_connections_is_empty():
    assert hub_with(Conn("c1", "alice")).of_user("bob") == []


def test_of_user_returns_a_copy_that_survives_a_remove():
    first, second = Conn("c1", "alice"), Conn("c2", "alice")
    hub = hub_with(first, second)
    conns = hub.of_user("alice")

    for conn in conns:
        hub.remove(conn)

    assert conns == [first, second] and hub.of_user("alice") == []


def test_changing_the_list_from_of_user_does_not_change_the_hub():
    conn = Conn("c1", "alice")
    hub = hub_with(conn)

    hub.of_user("alice").clear()

    assert hub.of_user("alice") == [conn]


def test_get_finds_a_connection_by_its_id():
    conn = Conn("c2", "bob")
    hub = hub_with(Conn("c1", "alice"), conn)

    assert hub.get("c2") is conn


def test_get_of_an_unknown_id_is_none():
    assert hub_with(Conn("c1", "alice")).get("c9") is None


def test_get_after_remove_is_none():
    conn = Conn("c1", "alice")
    hub = hub_with(conn)
    hub.remove(conn)

    assert hub.get("c1") is None


def test_counts_track_connections_and_users():
    hub = hub_with(Conn("c1", "alice"), Conn("c2", "alice"), Conn("c3", "bob"))

    assert (hub.connection_count, hub.user_count) == (3, 2)


def test_counts_of_an_empty_hub_are_zero():
    assert (Hub().connection_count, Hub().user_count) == (0, 0)


def test_a_user_disappears_after_their_last_connection_is_removed():
    conn = Conn("c1", "alice")
    hub = hub_with(conn, Conn("c2", "bob"))
    hub.remove(conn)

    assert (hub.users(), hub.user_count, hub.connection_count) == (["bob"], 1, 1)


def test_a_user_stays_while_one_connection_remains():
    first = Conn("c1", "alice")
    hub = hub_with(first, Conn("c2", "alice"))
    hub.remove(first)

    assert (hub.users(), hub.user_count, hub.connection_count) == (["alice"], 1, 1)


def test_all_and_iteration_list_every_connection():
    conns = [Conn("c1", "alice"), Conn("c2", "bob"), Conn("c3", "alice")]
    hub = hub_with(*conns)

    assert hub.all() == conns and list(hub) == conns


def test_iterating_the_hub_while_removing_is_safe():
    hub = hub_with(Conn("c1", "alice"), Conn("c2", "bob"))

    for conn in hub:
        hub.remove(conn)

    assert hub.connection_count == 0

