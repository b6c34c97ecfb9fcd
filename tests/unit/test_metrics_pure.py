"""The node's and auth's metrics, driven with plain calls and read back from their registries."""

from __future__ import annotations

import pytest

from auth.metrics import AuthMetrics
from tasks.ids import IdGenerator
from wsnode.closecodes import CloseCode
from wsnode.metrics import NodeMetrics

COLLECTED_AT = 1_800_000_000.0


def sample(metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def message_id_made_at(seconds: float) -> str:
    return IdGenerator(clock=lambda: seconds).next_id()


def test_a_4401_refusal_is_counted_under_its_code_and_no_other():
    metrics = NodeMetrics("127.0.0.1:8101")
    metrics.rejected(CloseCode.UNAUTHORIZED)
    metrics.rejected(CloseCode.UNAUTHORIZED)
    assert sample(metrics, "push_node_rejected_connections_total", code="4401") == 2
    assert sample(metrics, "push_node_rejected_connections_total", code="1013") == 0
    assert sample(metrics, "push_node_rejected_connections_total", code="4500") == 0


def test_known_refusal_codes_and_replay_outcomes_are_exported_as_zero_before_any_event():
    metrics = NodeMetrics("127.0.0.1:8101")
    for code in ("4401", "4500", "1013", "403", "503"):
        assert sample(metrics, "push_node_rejected_connections_total", code=code) == 0
    for outcome in ("served", "truncated", "failed"):
        assert sample(metrics, "push_node_replays_total", outcome=outcome) == 0


def test_http_refusals_before_the_upgrade_are_counted_by_status():
    metrics = NodeMetrics("127.0.0.1:8101")
    metrics.rejected(503)
    assert sample(metrics, "push_node_rejected_connections_total", code="503") == 1


def test_latency_is_the_time_since_the_millisecond_in_the_message_id():
    metrics = NodeMetrics("127.0.0.1:8101")
    metrics.latency(message_id_made_at(COLLECTED_AT), now=COLLECTED_AT + 0.2)
    name = "push_node_delivery_latency_seconds"
    assert sample(metrics, f"{name}_count") == 1
    assert sample(metrics, f"{name}_sum") == pytest.approx(0.2, abs=0.002)
    assert sample(metrics, f"{name}_bucket", le="0.1") == 0
    assert sample(metrics, f"{name}_bucket", le="0.25") == 1


def test_latency_reads_the_clock_it_was_given_when_no_time_is_passed():
    metrics = NodeMetrics("127.0.0.1:8101", clock=lambda: COLLECTED_AT + 3)
    metrics.latency(message_id_made_at(COLLECTED_AT))
    assert sample(metrics, "push_node_delivery_latency_seconds_sum") == pytest.approx(3, abs=0.002)


def test_a_message_id_from_a_clock_ahead_of_the_node_counts_as_zero_latency():
    metrics = NodeMetrics("127.0.0.1:8101")
    metrics.latency(message_id_made_at(COLLECTED_AT + 5), now=COLLECTED_AT)
    assert sample(metrics, "push_node_delivery_latency_seconds_sum") == 0
    assert sample(metrics, "push_node_delivery_latency_seconds_count") == 1


def test_a_string_that_is_not_a_message_id_is_not_observed():
    metrics = NodeMetrics("127.0.0.1:8101")
    metrics.latency("not-an-id", now=COLLECTED_AT)
    assert sample(metrics, "push_node_delivery_latency_seconds_count") == 0


def test_latencies_observe_each_message_id_against_one_clock_read_and_skip_what_is_not_an_id():
    reads = []
    metrics = NodeMetrics("127.0.0.1:8101", clock=lambda: reads.append(1) or COLLECTED_AT + 1)
    metrics.latencies([message_id_made_at(COLLECTED_AT), "not-an-id", message_id_made_at(COLLECTED_AT + 0.5)])
    name = "push_node_delivery_latency_seconds"
    assert len(reads) == 1
    assert sample(metrics, f"{name}_count") == 2
    assert sample(metrics, f"{name}_sum") == pytest.approx(1.5, abs=0.004)
    assert sample(metrics, f"{name}_bucket", le="0.5") == 1
    assert sample(metrics, f"{name}_bucket", le="1.0") == 2


def test_a_batch_counts_once_and_adds_its_queue_messages():
    metrics = NodeMetrics("127.0.0.1:8101")
    metrics.batch(3)
    metrics.batch(1)
    assert sample(metrics, "push_node_queue_batches_total") == 2
    assert sample(metrics, "push_node_queue_messages_total") == 4


def test_delivered_frames_are_counted_by_kind():
    metrics = NodeMetrics("127.0.0.1:8101")
    metrics.delivered("live", 5)
    metrics.delivered("replay", 2)
    metrics.delivered("live", 0)
    assert sample(metrics, "push_node_delivered_messages_total", kind="live") == 5
    assert sample(metrics, "push_node_delivered_messages_total", kind="replay") == 2


def test_gauges_read_the_node_at_each_scrape():
    state = {"connections": 0, "ready": False}
    metrics = NodeMetrics("127.0.0.1:8101")
    metrics.track(lambda: state["connections"], lambda: 1,
                  lambda: {"ready": state["ready"], "redis": True, "queue": state["ready"], "revocations": not state["ready"], "draining": False})
    assert sample(metrics, "push_node_connections") == 0
    assert sample(metrics, "push_node_ready") == 0
    assert sample(metrics, "push_node_revocations_subscribed") == 1
    state.update(connections=7, ready=True)
    assert sample(metrics, "push_node_connections") == 7
    assert sample(metrics, "push_node_ready") == 1
    assert sample(metrics, "push_node_queue_consumer_up") == 1
    assert sample(metrics, "push_node_revocations_subscribed") == 0
    assert sample(metrics, "push_node_users") == 1


def test_the_node_address_is_exported_as_an_info_metric():
    metrics = NodeMetrics("10.0.0.5:8101")
    assert sample(metrics, "push_node_info", node="10.0.0.5:8101") == 1


def test_two_nodes_in_one_process_count_separately():
    first, second = NodeMetrics("127.0.0.1:8101"), NodeMetrics("127.0.0.1:8102")
    first.connected()
    assert sample(first, "push_node_connects_total") == 1
    assert sample(second, "push_node_connects_total") == 0


def test_replays_and_lease_failures_are_counted():
    metrics = NodeMetrics("127.0.0.1:8101")
    metrics.replay("served")
    metrics.replay("failed")
    metrics.lease_failure()
    assert sample(metrics, "push_node_replays_total", outcome="served") == 1
    assert sample(metrics, "push_node_replays_total", outcome="failed") == 1
    assert sample(metrics, "push_node_lease_renewal_failures_total") == 1


def test_lost_leases_are_counted_per_user_and_for_the_nodes_own():
    metrics = NodeMetrics("127.0.0.1:8101")
    assert sample(metrics, "push_node_leases_lost_total", lease="user") == 0  # listed before the first
    metrics.leases_lost(node=False, users=3)
    metrics.leases_lost(node=True, users=0)
    assert sample(metrics, "push_node_leases_lost_total", lease="user") == 3
    assert sample(metrics, "push_node_leases_lost_total", lease="node") == 1


def test_an_unknown_replay_outcome_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="served, truncated, failed"):
        NodeMetrics("127.0.0.1:8101").replay("lost")


def test_render_gives_the_text_format_by_default_and_openmetrics_when_asked():
    metrics = NodeMetrics("127.0.0.1:8101")
    metrics.closed(CloseCode.GOING_AWAY)
    body, content_type = metrics.render(None)
    assert content_type.startswith("text/plain")
    assert b'push_node_closed_connections_total{code="1001"} 1.0' in body
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_auth_counts_verifications_by_result():
    metrics = AuthMetrics()
    metrics.verified("ok")
    metrics.verified("revoked")
    metrics.issued()
    assert sample(metrics, "auth_verifications_total", result="ok") == 1
    assert sample(metrics, "auth_verifications_total", result="revoked") == 1
    assert sample(metrics, "auth_verifications_total", result="expired") == 0
    assert sample(metrics, "auth_tokens_issued_total") == 1


def test_auth_counts_unknown_paths_under_one_route_label():
    metrics = AuthMetrics()
    metrics.request("/verify", 200, 0.003)
    metrics.request("/wp-admin", 404, 0.001)
    metrics.request("/.env", 404, 0.001)
    assert sample(metrics, "auth_requests_total", route="/verify", status="200") == 1
    assert sample(metrics, "auth_requests_total", route="other", status="404") == 2
    assert sample(metrics, "auth_request_duration_seconds_count", route="/verify") == 1


def test_auth_counts_tokens_verified_with_a_previous_secret_and_admin_requests_with_a_previous_key_from_zero():
    metrics = AuthMetrics()
    assert sample(metrics, "auth_verifications_previous_secret_total") == 0
    assert sample(metrics, "auth_admin_previous_key_requests_total") == 0
    metrics.verified_with_previous_secret()
    metrics.verified_with_previous_secret()
    metrics.previous_admin_key_used()
    assert sample(metrics, "auth_verifications_previous_secret_total") == 2
    assert sample(metrics, "auth_admin_previous_key_requests_total") == 1


def test_the_closed_connections_help_names_every_reason_the_node_closes_with_1013():
    """The scraper's only description of ``push_node_closed_connections_total{code="1013"}``: a
    resume that failed or overflowed, leases not written or lost (``_close_unroutable``, the
    lease check), and the queue connection to the broker given up on (``_queue_connection_lost``),
    as the README's metrics table says."""
    metrics = NodeMetrics("127.0.0.1:8101")
    help_text = next(family.documentation for family in metrics.registry.collect() if family.name == "push_node_closed_connections")
    for reason in ("resume failed", "lease", "queue connection to the broker"):
        assert reason in help_text, (reason, help_text)


def test_the_latency_histogram_renders_what_prometheus_clients_histogram_renders_for_the_same_values():
    """The node's own latency histogram (``LatencyHistogram``: a bisect and a list, where
    prometheus_client's ``Histogram`` took two locks per observation) against prometheus_client's,
    fed the same values: every bound itself (``le`` is inclusive), between bounds, zero, and past the
    top bound.  The exposition is the same, but for the ``_created`` series it does not render."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from wsnode.metrics import LATENCY_BUCKETS, LatencyHistogram

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LatencyHistogram("t_latency_seconds", "help text", LATENCY_BUCKETS, ours)
    reference = Histogram("t_latency_seconds", "help text", buckets=LATENCY_BUCKETS, registry=theirs)
    values = [0.0, *LATENCY_BUCKETS, *(b * 1.5 for b in LATENCY_BUCKETS), 0.0004, 1e6]
    for value in values:
        mine.observe(value)
        reference.observe(value)

    def lines(registry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]

    assert lines(ours) == lines(theirs)
    assert any('le="0.001"} 3.0' in line for line in lines(ours))  # 0.0, 0.0004 and the bound itself
