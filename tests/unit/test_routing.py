"""Pure tests of ``tasks.routing``: messages, routes and live nodes in, a per-node plan out."""

from __future__ import annotations

from tasks.routing import plan, recipients_of

A, B, C = "10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"


def msg(message_id: str, to, data=None, ts: float | None = 1.0) -> dict:
    return {"id": message_id, "to": to, "data": {"n": message_id} if data is None else data, "ts": ts}


# --- recipients_of ----------------------------------------------------------------------------


def test_recipients_of_lists_every_user_once_in_first_seen_order():
    messages = [msg("m1", ["bob", "alice"]), msg("m2", ["alice", "carol", "bob"])]

    assert recipients_of(messages) == ["bob", "alice", "carol"]


def test_recipients_of_leaves_broadcasts_out():
    messages = [msg("m1", "*"), msg("m2", ["alice"])]

    assert recipients_of(messages) == ["alice"]


def test_recipients_of_only_broadcasts_is_empty():
    assert recipients_of([msg("m1", "*")]) == []


def test_recipients_of_accepts_tuples_of_users():
    assert recipients_of([msg("m1", ("alice", "bob"))]) == ["alice", "bob"]


# --- plan -------------------------------------------------------------------------------------


def test_plan_of_no_messages_is_empty():
    assert plan([], {"alice": [A]}, [A]) == {}


def test_plan_groups_users_on_one_node_into_one_envelope():
    result = plan([msg("m1", ["alice", "bob"])], {"alice": [A], "bob": [A]}, [A])

    assert result == {A: [{"id": "m1", "to": ["alice", "bob"], "data": {"n": "m1"}, "ts": 1.0}]}


def test_plan_splits_recipients_by_node():
    result = plan([msg("m1", ["alice", "bob"])], {"alice": [A], "bob": [B]}, [A, B])

    assert {node: [e["to"] for e in envelopes] for node, envelopes in result.items()} == {A: [["alice"]], B: [["bob"]]}


def test_plan_has_one_list_per_node_for_a_batch_of_messages():
    messages = [msg("m1", ["alice"]), msg("m2", ["bob"]), msg("m3", ["alice", "bob"])]

    result = plan(messages, {"alice": [A], "bob": [A]}, [A])

    assert list(result) == [A] and len(result[A]) == 3


def test_plan_keeps_message_order_within_each_node():
    messages = [msg(f"m{i}", ["alice"] if i % 2 else ["bob"]) for i in range(6)]

    result = plan(messages, {"alice": [A], "bob": [A, B]}, [A, B])

    assert [e["id"] for e in result[A]] == ["m0", "m1", "m2", "m3", "m4", "m5"] and [e["id"] for e in result[B]] == ["m0", "m2", "m4"]


def test_a_user_connected_to_two_nodes_is_named_on_both():
    result = plan([msg("m1", ["alice"])], {"alice": [A, B]}, [A, B])

    assert (result[A][0]["to"], result[B][0]["to"]) == (["alice"], ["alice"])


def test_a_route_to_a_node_that_is_not_live_is_ignored():
    result = plan([msg("m1", ["alice", "bob"])], {"alice": [A], "bob": [B]}, [A])

    assert list(result) == [A] and result[A][0]["to"] == ["alice"]


def test_a_message_whose_only_routes_are_to_dead_nodes_plans_nothing():
    assert plan([msg("m1", ["alice"])], {"alice": [B]}, [A]) == {}


def test_a_user_without_a_route_is_skipped():
    result = plan([msg("m1", ["alice", "ghost"])], {"alice": [A]}, [A])

    assert result[A][0]["to"] == ["alice"]


def test_a_message_only_for_users_without_routes_plans_nothing():
    assert plan([msg("m1", ["ghost"])], {}, [A]) == {}


def test_a_broadcast_goes_to_every_live_node_with_to_star():
    result = plan([msg("m1", "*")], {}, [A, B])

    assert {node: [e["to"] for e in envelopes] for node, envelopes in result.items()} == {A: ["*"], B: ["*"]}


def test_a_broadcast_skips_nodes_that_only_appear_in_routes():
    result = plan([msg("m1", "*")], {"alice": [C]}, [A])

    assert list(result) == [A]


def test_a_broadcast_with_no_live_node_plans_nothing():
    assert plan([msg("m1", "*")], {}, []) == {}


def test_a_node_listed_twice_as_live_gets_a_broadcast_once():
    result = plan([msg("m1", "*")], {}, [A, A])

    assert len(result[A]) == 1


def test_broadcasts_and_direct_messages_keep_their_order_on_a_node():
    messages = [msg("m1", ["alice"]), msg("m2", "*"), msg("m3", ["alice"])]

    result = plan(messages, {"alice": [A]}, [A])

    assert [e["id"] for e in result[A]] == ["m1", "m2", "m3"]


def test_ts_passes_through_to_every_envelope():
    result = plan([msg("m1", ["alice"], ts=1234.5), msg("m2", "*", ts=99.0)], {"alice": [A]}, [A])

    assert [e["ts"] for e in result[A]] == [1234.5, 99.0]


def test_a_message_without_ts_gets_ts_none():
    message = {"id": "m1", "to": ["alice"], "data": 1}

    assert plan([message], {"alice": [A]}, [A])[A][0]["ts"] is None


def test_data_is_passed_unchanged():
    data = {"text": "héllo", "list": [1, None, True]}

    assert plan([msg("m1", ["alice"], data=data)], {"alice": [A]}, [A])[A][0]["data"] == data


def test_plan_accepts_generators_for_messages_and_live_nodes():
    result = plan((m for m in [msg("m1", ["alice"])]), {"alice": [A]}, (n for n in [A]))

    assert result[A][0]["id"] == "m1"
