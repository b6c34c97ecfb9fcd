"""The benchmark clients (bench/wsclients.py) ack as push.js does: one frame per ack to a node
whose hello says no ``ack_ids``; where it does, the acks of one turn of the loop together, in
``ids`` frames of at most ``ack_ids`` ids, at the next turn (pure: no socket, writes recorded)."""

import asyncio
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
wsclients = pytest.importorskip("wsclients")


def test_acks_of_one_loop_turn_go_together_where_hello_said_ack_ids_and_one_by_one_elsewhere():
    async def acks() -> tuple[list, list]:
        clients = wsclients.ClientSet(3)
        written: list = []
        clients.write = lambda index, text: written.append((index, json.loads(text)))
        clients.ack_ids = [2, 0, 5]
        for index, message_id in ((0, "a"), (2, "x"), (0, "b"), (1, "z"), (0, "c")):
            clients.ack(index, message_id)
        at_once = list(written)
        await asyncio.sleep(0)  # the next turn of the loop
        return at_once, written

    at_once, written = asyncio.run(acks())

    assert at_once == [(1, {"type": "ack", "id": "z"})]
    assert written == [
        (1, {"type": "ack", "id": "z"}),
        (0, {"type": "ack", "ids": ["a", "b"]}),
        (0, {"type": "ack", "id": "c"}),
        (2, {"type": "ack", "id": "x"}),
    ]
