"""Pure tests of ``tasks.batching``: when the worker hands buffered ``tasks.collect`` and
``tasks.collect_many`` requests to its pool (``FlushGate``), how many at a time and which may run beside each other
(``ordered_batches``), and whom a request names (``request_users``)."""

from __future__ import annotations

from tasks.batching import EVERYONE, FlushGate, ordered_batches, request_users


def test_an_idle_pool_takes_a_batch_at_once():
    assert FlushGate().may_flush()


def test_requests_gather_while_a_batch_runs():
    gate = FlushGate()
    gate.started()
    assert not gate.may_flush()
    assert gate.running == 1


def test_with_a_higher_limit_batches_go_until_that_many_run():
    gate = FlushGate(limit=2)
    gate.started()
    assert gate.may_flush()
    gate.started()
    assert not gate.may_flush() and gate.running == 2


def test_a_limit_below_one_still_runs_one_batch_at_a_time():
    gate = FlushGate(limit=0)
    assert gate.may_flush()
    gate.started()
    assert not gate.may_flush()


def test_a_returned_batch_lets_what_gathered_go():
    gate = FlushGate()
    token = gate.started()
    gate.finished(token)
    assert gate.may_flush() and gate.running == 0


def test_a_batch_returning_twice_frees_one_slot_only():
    gate = FlushGate(limit=2)
    first = gate.started()
    gate.started()
    gate.finished(first)
    gate.started()
    gate.finished(first)  # e.g. a result callback and a lost-worker callback for the same batch
    assert not gate.may_flush()


def test_after_a_reset_batches_from_before_neither_hold_nor_free_a_slot():
    gate = FlushGate()
    old = gate.started()
    gate.reset()
    assert gate.running == 0 and gate.may_flush()
    new = gate.started()
    gate.finished(old)
    assert gate.running == 1 and not gate.may_flush()
    gate.finished(new)
    assert gate.may_flush()


def batches_of(items, users=None, size=None, limit=1000, running=()):
    """``ordered_batches`` with each item its own size and user by default, answering the batches
    alone (without their users) and what waits."""
    batches, waiting = ordered_batches(items, users or (lambda item: frozenset({item[0]})), size or (lambda item: item[1]), limit, running)
    return [batch for batch, _ in batches], waiting


def test_batches_keep_the_order_and_cut_where_the_sizes_would_pass_the_limit():
    items = [("a", 400), ("b", 500), ("c", 200), ("d", 1000), ("e", 1)]
    assert batches_of(items) == ([[("a", 400), ("b", 500)], [("c", 200)], [("d", 1000)], [("e", 1)]], [])


def test_an_item_bigger_than_the_limit_goes_alone_and_whole():
    assert batches_of([("a", 5), ("b", 2000), ("c", 5)]) == ([[("a", 5)], [("b", 2000)], [("c", 5)]], [])


def test_items_of_no_size_count_as_one():
    assert batches_of([(u, 0) for u in "vwxyz"], limit=2) == ([[("v", 0), ("w", 0)], [("x", 0), ("y", 0)], [("z", 0)]], [])


def test_nothing_makes_no_batch():
    assert ordered_batches([], len, len, 10) == ([], [])


def test_a_request_of_a_user_whose_batch_runs_waits_and_so_does_every_later_one_of_that_user():
    items = [("a", 1), ("b", 1), ("a", 1), ("c", 1)]
    assert batches_of(items, running=[frozenset({"a"})]) == ([[("b", 1), ("c", 1)]], [("a", 1), ("a", 1)])


def test_one_user_in_two_batches_of_one_flush_waits_for_the_first_and_other_users_go_beside():
    # the first batch is full at 1000; the next of "a" would run beside it: it waits, and the
    # later "a" behind it too, while "b" starts a batch beside the first
    items = [("a", 600), ("x", 400), ("a", 600), ("b", 600), ("a", 1)]
    assert batches_of(items) == ([[("a", 600), ("x", 400)], [("b", 600)]], [("a", 600), ("a", 1)])


def test_a_request_that_fits_goes_in_the_same_batch_as_an_earlier_one_of_its_user():
    assert batches_of([("a", 1), ("a", 1), ("b", 1)]) == ([[("a", 1), ("a", 1), ("b", 1)]], [])


def test_a_request_to_everyone_waits_for_any_batch_that_runs_and_holds_back_what_comes_after_it():
    everyone = lambda item: EVERYONE if item[0] == "*" else frozenset({item[0]})  # noqa: E731
    items = [("*", 1), ("a", 1), ("b", 1)]
    assert batches_of(items, users=everyone, running=[frozenset({"z"})]) == ([], items)
    # with nothing running it goes, and a later batch cut beside it cannot start
    items = [("a", 999), ("*", 1), ("b", 5)]
    assert batches_of(items, users=everyone) == ([[("a", 999), ("*", 1)]], [("b", 5)])
    # and a batch to everyone that runs holds back everyone else
    assert batches_of([("a", 1)], running=[EVERYONE]) == ([], [("a", 1)])


def test_a_request_waits_behind_the_other_tasks_request_of_its_user_read_before_it_and_only_that():
    # items: (user, size, read number); earlier: the other task's requests not started yet
    items = [("a", 1, 2), ("b", 1, 3), ("c", 1, 6), ("a", 1, 7)]
    earlier = [(1, frozenset({"a"})), (5, frozenset({"c"})), (9, frozenset({"b"}))]
    batches, waiting = ordered_batches(items, lambda item: frozenset({item[0]}), lambda item: item[1], 1000, (), earlier, lambda item: item[2])
    # "a" read 2 waits for the other's "a" read 1, and the later "a" behind it; "c" read 6 waits
    # for the other's "c" read 5; "b" read 3 goes: the other's "b" was read after it
    assert [batch for batch, _ in batches] == [[("b", 1, 3)]]
    assert waiting == [("a", 1, 2), ("c", 1, 6), ("a", 1, 7)]


def test_the_other_tasks_request_to_everyone_holds_back_what_was_read_after_it():
    items = [("a", 1, 1), ("b", 1, 3)]
    batches, waiting = ordered_batches(items, lambda item: frozenset({item[0]}), lambda item: item[1], 1000, (), [(2, EVERYONE)], lambda item: item[2])
    assert [batch for batch, _ in batches] == [[("a", 1, 1)]] and waiting == [("b", 1, 3)]


def test_each_batch_comes_with_the_users_it_names():
    batches, waiting = ordered_batches([("a", 600), ("b", 300), ("c", 600)], lambda item: frozenset({item[0]}), lambda item: item[1], 1000)
    assert [(len(batch), users) for batch, users in batches] == [(2, frozenset({"a", "b"})), (1, frozenset({"c"}))]
    assert waiting == []


def test_a_request_names_its_to_or_each_items_to():
    assert request_users((), {"to": "alice", "data": 1}) == frozenset({"alice"})
    assert request_users((), {"to": ["alice", "bob", "alice"], "data": 1}) == frozenset({"alice", "bob"})
    assert request_users((), {"to": "*", "data": 1}) is EVERYONE
    assert request_users((), {"messages": [{"to": "a"}, {"to": ["b", "c"]}]}) == frozenset("abc")
    assert request_users(([{"to": "a"}, {"to": "b"}],), {}) == frozenset("ab")  # collect_many's list as its one argument
    assert request_users((), {"messages": [{"to": "a"}, {"to": "*"}]}) is EVERYONE


def test_what_is_not_a_user_id_names_nobody():
    # the pool refuses such a request or item, which sends nothing: it need not wait for anyone
    assert request_users((), {}) == frozenset()
    assert request_users((), {"to": 5}) == frozenset()
    assert request_users((), {"to": ["a", 5, None, ["b"]]}) == frozenset({"a"})
    assert request_users((), {"messages": ["x", 5, {"data": 1}, {"to": "a"}]}) == frozenset({"a"})
    assert request_users((), {"messages": "not a list"}) == frozenset()
    assert request_users(None, None) == frozenset()
    assert request_users(("a", "b"), {}) == frozenset()  # two positional arguments: refused


def test_a_batch_of_both_tasks_gets_the_shorter_of_their_time_limits_and_the_workers_where_a_task_sets_none():
    from types import SimpleNamespace

    from tasks.batching import batch_time_limits

    def task(soft=None, hard=None):
        return SimpleNamespace(soft_time_limit=soft, time_limit=hard)

    worker = SimpleNamespace(task_soft_time_limit=None, task_time_limit=None)
    assert batch_time_limits([task(), task()], worker) == (None, None)
    assert batch_time_limits([task(soft=30, hard=60), task()], worker) == (30, 60)
    assert batch_time_limits([task(soft=30, hard=60), task(soft=10, hard=90)], worker) == (10, 60)
    limited = SimpleNamespace(task_soft_time_limit=20, task_time_limit=40)
    assert batch_time_limits([task(soft=30, hard=60), task()], limited) == (20, 40)  # the other task: the worker's
    assert batch_time_limits([task(soft=30, hard=60)], limited) == (30, 60)  # a task's own goes before the worker's
