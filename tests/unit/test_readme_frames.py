"""Pure tests that README.md's WebSocket protocol section says what the code does: the
server -> client table against the frames ``wsnode/protocol.py``'s builders really produce (which
types, which keys), and the client -> server frames against ``protocol.parse_client_frame`` (the
README's examples are accepted, what the parser accepts is documented, an unknown type closes with
4500).  No sockets, no processes.

The frame builders are found by name in ``protocol`` (functions ``*_frame`` but the parser, strings
``*_FRAME``), so that a new one without a README row, or without a sample below, fails a test; a
guard checks that no other ``wsnode`` module writes a frame of its own.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import pytest

from tasks.ids import lower_bound
from tests.unit.test_readme_tables import DOCUMENTED, README, ROOT, backticked, table_rows
from wsnode import protocol
from wsnode.closecodes import CloseCode

PROTOCOL_SOURCE = Path(protocol.__file__).read_text(encoding="utf-8")
MESSAGE_ID = lower_bound(1_700_000_000_000)

#: One real frame from each builder of ``protocol``, with every optional argument given, so that
#: keys the builder adds only sometimes (``resumed``'s ``cursor``) are in it.
SAMPLE_FRAMES = {
    "hello_frame": protocol.hello_frame("127.0.0.1:8101", "alice", "conn-1", 1_700_000_600, 1_700_000_000.0, 145),
    "message_frame": protocol.message_frame({"id": MESSAGE_ID, "data": {"text": "hi"}}),
    "resumed_frame": protocol.resumed_frame(MESSAGE_ID, 3, False, cursor=MESSAGE_ID),
    "refreshed_frame": protocol.refreshed_frame(1_700_000_600, 1_700_000_000.0),
    "refresh_error_frame": protocol.refresh_error_frame("auth unavailable, try again"),
    "PONG_FRAME": protocol.PONG_FRAME,
}

#: Keys a builder adds only under a condition (found below in its source), with the words of the
#: README's row that tell a client the key may be missing.  A conditional key not listed here fails
#: a test: document when it is absent, then list it.
CONDITIONAL_KEYS = {
    ("resumed", "cursor"): "send no cursor",  # None from workers of earlier versions
}

#: What the README's client examples hold in place of a value, and a value the parser takes there.
PLACEHOLDERS = {
    '"<message id>", ...': json.dumps(MESSAGE_ID),  # inside a list: ["<message id>", ...]
    '"<message id>"': json.dumps(MESSAGE_ID),
    '"..."': '"a-new-token"',
}

#: What the contract (../shared/CONTRACT.md, "WebSocket") fixes: the keys a message frame has at
#: least, and the ack a client sends.
CONTRACT_MESSAGE_KEYS = {"type", "id", "data"}
CONTRACT_ACK = '{"type": "ack", "id": "<message id>"}'


def builder_names() -> set[str]:
    """The frame builders of ``protocol``: its functions named ``*_frame`` (not the parser) and its
    strings named ``*_FRAME``."""
    names = set()
    for name, value in vars(protocol).items():
        if name.endswith("_frame") and inspect.isfunction(value) and value.__module__ == protocol.__name__ and not name.startswith("parse_"):
            names.add(name)
        elif name.endswith("_FRAME") and isinstance(value, str):
            names.add(name)
    return names


def sent() -> dict[str, set[str]]:
    """Each frame type the node sends, with the keys of its sample frame."""
    frames = [json.loads(frame) for frame in SAMPLE_FRAMES.values()]
    return {frame["type"]: set(frame) for frame in frames}


def conditional_keys() -> set[tuple[str, str]]:
    """``(type, key)`` for each key a builder sets by ``frame["key"] = ...`` after building its dict
    (which only a condition would make worth writing so)."""
    found = set()
    for function in ast.parse(PROTOCOL_SOURCE).body:
        if not (isinstance(function, ast.FunctionDef) and function.name in SAMPLE_FRAMES):
            continue
        kind = json.loads(SAMPLE_FRAMES[function.name])["type"]
        for node in ast.walk(function):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant):
                        found.add((kind, target.slice.value))
    return found


def documented_server_frames(text: str) -> dict[str, tuple[set[str], str]]:
    """Each row of the server -> client table: its type, with the keys of its JSON example and its
    "when" cell.  The examples hold placeholders (``<unix s>``), so keys are read, not JSON."""
    documented = {}
    for frame_cell, when in table_rows(text, "| frame | when |"):
        example = backticked(frame_cell)[0]
        kind = re.match(r'\{"type": "(\w+)"', example)
        assert kind, f"README.md's server -> client row {example[:60]!r} does not start {{\"type\": \"...\""
        assert kind[1] not in documented, f"README.md's server -> client table lists {kind[1]} twice"
        documented[kind[1]] = (set(re.findall(r'"(\w+)":', example)), when)
    return documented


def client_paragraph(text: str) -> str:
    """The README paragraph that starts ``Client -> server:``, on one line."""
    match = re.search(r"^Client -> server:.*?(?=\n\n)", text, re.M | re.S)
    assert match, "README.md has no paragraph starting 'Client -> server:'"
    return match[0].replace("\n", " ")


def documented_client_frames(text: str) -> list[str]:
    """The JSON examples (``{"type": ...}``) of the client -> server paragraph."""
    # A line break inside an example became a space after '{"type":'; json.dumps writes one too.
    return [example for example in backticked(client_paragraph(text)) if example.startswith('{"type"')]


def parser_types() -> set[str]:
    """The types ``parse_client_frame`` compares the frame's ``type`` with (``kind == "ack"``)."""
    function = next(node for node in ast.parse(PROTOCOL_SOURCE).body if isinstance(node, ast.FunctionDef) and node.name == "parse_client_frame")
    return {node.comparators[0].value for node in ast.walk(function)
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "kind"
            and isinstance(node.ops[0], ast.Eq) and isinstance(node.comparators[0], ast.Constant)}


def filled(example: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        example = example.replace(placeholder, value)
    return example


SERVER = documented_server_frames(README)
CLIENT = documented_client_frames(README)


def test_the_parsing_finds_frames_at_all():
    # Guards the parsing above: an empty result would make every test below pass vacuously.
    assert {"hello", "message"} <= set(SERVER) and len(CLIENT) >= 3 and {"ack", "ping"} <= parser_types()


def test_every_builder_of_protocol_has_a_sample_frame_here():
    assert builder_names() == set(SAMPLE_FRAMES), (
        f"wsnode/protocol.py's frame builders and this test's SAMPLE_FRAMES differ: only in the code "
        f"{sorted(builder_names() - set(SAMPLE_FRAMES))}, only here {sorted(set(SAMPLE_FRAMES) - builder_names())}: "
        f"build one frame with each (every optional argument given)")


def test_no_other_wsnode_module_writes_a_frame_of_its_own():
    # Frames are built in protocol.py only, so that the builders above are all the node sends.
    writers = []
    for path in sorted((ROOT / "wsnode").glob("*.py")):
        if path.name == "protocol.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict) and any(isinstance(key, ast.Constant) and key.value == "type" for key in node.keys):
                writers.append(f"{path.name}:{node.lineno}")
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  and re.search(r'"type"\s*:', node.value)):
                writers.append(f"{path.name}:{node.lineno}")
    assert not writers, f"frames written outside wsnode/protocol.py at {', '.join(writers)}: add a builder there (and a README row)"


def test_the_server_table_lists_exactly_the_types_the_node_sends():
    documented, code = set(SERVER), set(sent())
    assert documented == code, (f"README.md's server -> client table and wsnode/protocol.py's builders differ: only in the README "
                                f"{sorted(documented - code)} (drop the row), only in the code {sorted(code - documented)} (add a row)")


@pytest.mark.parametrize("kind", sorted(sent()))
def test_the_server_table_shows_the_keys_the_builder_writes(kind):
    if kind not in SERVER:
        pytest.skip(f"{kind} is not in the README table (the test above fails for it)")
    documented, keys = SERVER[kind][0], sent()[kind]
    assert documented == keys, (f"README.md's {kind} example has the keys {sorted(documented)}, protocol.py's builder writes "
                                f"{sorted(keys)}: only in the README {sorted(documented - keys)}, only in the code {sorted(keys - documented)}")


@pytest.mark.parametrize("kind, key", sorted(conditional_keys()))
def test_the_readme_says_when_a_conditional_key_is_missing(kind, key):
    words = CONDITIONAL_KEYS.get((kind, key))
    assert words is not None, (f"protocol.py writes {kind}'s {key!r} only sometimes: say in README.md's {kind} row when it is "
                               f"missing, then add ({kind!r}, {key!r}) to CONDITIONAL_KEYS with those words")
    assert words in SERVER[kind][1], f"README.md's {kind} row does not say when {key!r} is missing ({words!r})"


def test_the_hello_example_shows_the_ack_ids_of_the_default_max_frame_bytes():
    # DOCUMENTED: the README's configuration table, which test_readme_tables checks against settings.py.
    default = int(backticked(DOCUMENTED["MAX_FRAME_BYTES"])[0])
    example = backticked(next(cell for cell, _when in table_rows(README, "| frame | when |") if '"type": "hello"' in cell))[0]
    shown = int(re.search(r'"ack_ids": (\d+)', example)[1])
    assert shown == protocol.ack_ids_limit(default), (f"README.md's hello example shows \"ack_ids\": {shown}, but a node at the default "
                                                      f"MAX_FRAME_BYTES ({default}) sends {protocol.ack_ids_limit(default)}")
    assert f"at most {protocol.MAX_ACK_IDS:,}" in SERVER["hello"][1], f"README.md's hello row does not say ack_ids is at most {protocol.MAX_ACK_IDS:,}"


def test_the_message_frame_and_the_ack_keep_to_the_contract():
    assert CONTRACT_MESSAGE_KEYS <= SERVER["message"][0], f"README.md's message frame lacks the contract's keys {sorted(CONTRACT_MESSAGE_KEYS)}"
    assert CONTRACT_MESSAGE_KEYS <= sent()["message"], f"protocol.message_frame lacks the contract's keys {sorted(CONTRACT_MESSAGE_KEYS)}"
    assert CONTRACT_ACK in CLIENT, f"README.md's client -> server paragraph does not show the contract's ack, {CONTRACT_ACK}"


@pytest.mark.parametrize("example", CLIENT)
def test_the_parser_accepts_each_documented_client_frame(example):
    frame = filled(example)
    try:
        json.loads(frame)
    except ValueError:
        pytest.fail(f"README.md's client frame {example!r} is not JSON once its placeholders are filled ({frame!r}): add them to PLACEHOLDERS")
    try:
        protocol.parse_client_frame(frame)
    except protocol.ProtocolError as exc:
        pytest.fail(f"README.md documents the client frame {example!r}, which the parser refuses ({exc})")


def test_every_client_type_the_parser_accepts_is_documented():
    documented = {json.loads(filled(example))["type"] for example in CLIENT}
    accepted = parser_types()
    assert documented == accepted, (f"README.md's client -> server frames and protocol.parse_client_frame differ: only in the README "
                                    f"{sorted(documented - accepted)}, only in the parser {sorted(accepted - documented)}")


def test_an_unknown_client_type_closes_with_4500_as_the_readme_says():
    with pytest.raises(protocol.ProtocolError) as refused:
        protocol.parse_client_frame('{"type": "subscribe"}')
    assert refused.value.code == CloseCode.BAD_REQUEST == 4500
    row = {int(code): meaning for code, meaning, _client in table_rows(README, "| code | meaning |")}[4500]
    named = set(backticked(row))
    assert parser_types() <= named, f"README.md's 4500 row does not name every frame type the parser accepts: {sorted(parser_types() - named)}"
