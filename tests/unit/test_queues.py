"""Pure tests of ``tasks.queues``: kombu objects built from an address, no connection opened."""

from __future__ import annotations

from tasks.queues import ARGSREPR_IDS, DELIVER_TASK, NODE_QUEUE_EXPIRES_MS, deliver_argsrepr, node_address, node_queue

ADDRESS = "10.0.0.7:8765"


def test_node_address_is_host_colon_port():
    assert node_address("10.0.0.7", 8765) == ADDRESS


def test_node_address_keeps_a_host_name_as_given():
    assert node_address("push-1.internal", 80) == "push-1.internal:80"


def test_the_node_queue_is_named_after_the_address():
    assert node_queue(ADDRESS).name == ADDRESS


def test_the_node_queue_exchange_is_named_after_the_address():
    assert node_queue(ADDRESS).exchange.name == ADDRESS


def test_the_node_queue_exchange_is_direct():
    assert node_queue(ADDRESS).exchange.type == "direct"


def test_the_node_queue_routing_key_is_the_address():
    assert node_queue(ADDRESS).routing_key == ADDRESS


def test_the_node_queue_expires_when_unused():
    assert node_queue(ADDRESS).queue_arguments == {"x-expires": NODE_QUEUE_EXPIRES_MS}


def test_the_expiry_is_a_positive_whole_number_of_milliseconds():
    assert isinstance(NODE_QUEUE_EXPIRES_MS, int) and NODE_QUEUE_EXPIRES_MS > 0


def test_the_node_queue_is_durable():
    assert node_queue(ADDRESS).durable is True


def test_two_calls_declare_equal_queues():
    # The worker and the node each build the queue; both must declare it alike.
    first, second = node_queue(ADDRESS), node_queue(ADDRESS)

    assert (first.name, first.exchange.name, first.routing_key, first.queue_arguments) == (second.name, second.exchange.name, second.routing_key, second.queue_arguments)


def test_the_deliver_task_name_is_wsnode_deliver():
    assert DELIVER_TASK == "wsnode.deliver"


def test_a_deliver_argsrepr_names_the_count_and_the_first_ids():
    envelopes = [{"id": f"m{n}", "to": ["u"], "data": "x" * 1000} for n in range(ARGSREPR_IDS + 2)]
    assert deliver_argsrepr(envelopes) == f"[<{ARGSREPR_IDS + 2} envelopes: m0, m1, m2, ...>]"
    assert deliver_argsrepr(envelopes[:1]) == "[<1 envelope: m0>]"
    assert "x" not in deliver_argsrepr(envelopes)


def test_envelopes_are_split_in_order_into_runs_of_at_most_the_given_bytes_one_too_big_alone():
    from tasks.queues import by_size

    envelopes = [{"id": str(n), "to": ["u"], "data": "x" * size} for n, size in enumerate([20, 20, 20, 500, 20])]

    runs = by_size(envelopes, most=200)

    assert [[e["id"] for e in run] for run in runs] == [["0", "1"], ["2"], ["3"], ["4"]]
    assert by_size([], most=200) == []


def test_a_batch_that_cannot_reach_the_limit_is_one_run_unmeasured(monkeypatch):
    from tasks import queues

    monkeypatch.setattr(queues.wirejson, "dumps", None)  # not called
    envelopes = [{"id": str(n), "to": ["u"], "data": n} for n in range(10)]
    assert queues.by_size(envelopes) == [envelopes]
