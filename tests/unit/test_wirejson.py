"""tasks.wirejson: the platform's own JSON (pure)."""

import json

from kombu import serialization

from tasks import wirejson


def test_what_it_writes_reads_back_as_the_same_json_with_the_standard_library():
    value = {"id": "18f3a", "to": ["ann", "bób"], "data": {"t": 1795780000.125, "n": [1, -2, 3.5e-7, None, True], "s": "é\n\"\\"}, "ts": None}

    assert json.loads(wirejson.dumps(value)) == value
    assert json.loads(wirejson.text(value)) == value
    assert "bób" in wirejson.text(value), "non-ASCII is kept, as in frames before"
    assert wirejson.loads(wirejson.dumps(value)) == value


def test_what_orjson_refuses_falls_back_to_the_encoders_used_before():
    big = {"n": 2**70}

    assert json.loads(wirejson.dumps(big)) == big
    assert wirejson.text(big) == '{"n":1180591620717411303424}'


def test_loads_refuses_what_is_not_json():
    for bad in ("", "{", "NaN", "[1,]", b"\xff"):
        try:
            wirejson.loads(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} decoded")


def test_registered_as_an_encoder_only_so_json_is_still_decoded_and_named_by_kombu():
    decoder = serialization.registry._decoders[wirejson.CONTENT_TYPE]
    wirejson.register()
    wirejson.register()

    content_type, encoding, payload = serialization.dumps({"a": [1, 2]}, serializer=wirejson.SERIALIZER)
    assert (content_type, encoding) == ("application/json", "utf-8")
    assert serialization.loads(payload, content_type, encoding, accept=serialization.prepare_accept_content(["json"])) == {"a": [1, 2]}
    assert serialization.registry._decoders[wirejson.CONTENT_TYPE] is decoder
    assert serialization.registry.type_to_name[wirejson.CONTENT_TYPE] == "json"
