"""Pure tests of ``settings`` and ``settingtypes``: the private reader and converters fed a plain dict as the environment.

The module is imported once (with whatever the real environment holds) and never reloaded.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from settings import DEV_AUTH_ADMIN_KEY, DEV_AUTH_SECRET, SettingsError, _read, _secret_list, named_secrets, redact, secret_problems
from settingtypes import RESULT_BACKEND_SCHEMES, _choice, _database_name, _origins, _port, _non_negative_ms, _positive_float, _positive_int, _positive_seconds, _result_backend, _url


def read(env: dict, convert=int, default=7, expected: str = "a whole number"):
    return _read(env, "SOME_VAR", default, convert, expected)


def failure(env: dict, convert=int, expected: str = "a whole number") -> str:
    with pytest.raises(SettingsError) as caught:
        read(env, convert, expected=expected)
    return str(caught.value)


# --- _read ------------------------------------------------------------------------------------


def test_an_unset_variable_gives_the_default():
    assert read({}) == 7


def test_an_empty_variable_gives_the_default():
    assert read({"SOME_VAR": ""}) == 7


def test_the_default_is_returned_as_is_without_conversion():
    assert read({}, convert=int, default="not converted") == "not converted"


def test_a_set_variable_is_converted():
    assert read({"SOME_VAR": "42"}) == 42


def test_other_variables_are_ignored():
    assert read({"OTHER_VAR": "42"}) == 7


def test_a_bad_value_raises_settings_error():
    with pytest.raises(SettingsError):
        read({"SOME_VAR": "forty"})


def test_the_error_names_the_variable():
    assert "SOME_VAR=" in failure({"SOME_VAR": "forty"})


def test_the_error_shows_the_bad_value():
    assert "'forty'" in failure({"SOME_VAR": "forty"})


def test_the_error_says_what_form_is_expected():
    assert "expected a whole number of seconds" in failure({"SOME_VAR": "forty"}, expected="a whole number of seconds")


def test_the_error_includes_the_converters_own_explanation():
    assert "must be between 1 and 65535" in failure({"SOME_VAR": "70000"}, convert=_port)


def test_settings_error_is_a_value_error():
    assert issubclass(SettingsError, ValueError)


# --- converters -------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, value", [("1", 1), ("8000", 8000), ("65535", 65535)])
def test_port_accepts_1_to_65535(raw, value):
    assert _port(raw) == value


@pytest.mark.parametrize("raw", ["0", "65536", "-1", "http", "80.5"])
def test_port_rejects_values_outside_1_to_65535(raw):
    with pytest.raises(ValueError):
        _port(raw)


@pytest.mark.parametrize("raw, value", [("1", 1), ("3600", 3600)])
def test_positive_int_accepts_whole_numbers_above_zero(raw, value):
    assert _positive_int(raw) == value


@pytest.mark.parametrize("raw", ["0", "-5", "1.5", "ten"])
def test_positive_int_rejects_zero_negatives_fractions_and_words(raw):
    with pytest.raises(ValueError):
        _positive_int(raw)


@pytest.mark.parametrize("raw, value", [("1", 1), ("100000000", 100_000_000)])
def test_whole_seconds_accept_1_to_max_seconds(raw, value):
    assert _positive_seconds(raw) == value


@pytest.mark.parametrize("raw", ["0", "-5", "1.5", "100000001", "10000000000", "ten"])
def test_whole_seconds_reject_zero_negatives_fractions_words_and_more_than_max_seconds(raw):
    # 10**10 s passed as BROKER_TIMEOUT overflowed the socket timeouts: the worker stopped with a traceback
    with pytest.raises(ValueError):
        _positive_seconds(raw)


@pytest.mark.parametrize("raw, ok", [("0", True), ("100000000000", True), ("100000000001", False), ("-1", False)])
def test_whole_milliseconds_take_0_to_max_seconds(raw, ok):
    if ok:
        assert _non_negative_ms(raw) == int(raw)
    else:
        with pytest.raises(ValueError):
            _non_negative_ms(raw)


@pytest.mark.parametrize("raw, value", [("0.5", 0.5), ("30", 30.0), ("1e-3", 0.001)])
def test_positive_float_accepts_numbers_above_zero(raw, value):
    assert _positive_float(raw) == value


@pytest.mark.parametrize("raw", ["0", "-1.5", "nan", "soon", "inf", "1e300", "1e10"])
def test_positive_float_rejects_zero_negatives_nan_infinite_or_huge_and_words(raw):
    """An infinite or huge duration overflowed where it was used: HOUSEKEEPING_SECONDS=inf killed
    the worker's scheduler thread at start (no housekeeping ever), LEASE_TTL=inf crashed a node."""
    with pytest.raises(ValueError):
        _positive_float(raw)


@pytest.mark.parametrize("raw", ["push", "push_tests_1a2b", "Push-2", "é" * 31, "x" * 63])
def test_database_name_accepts_what_mongodb_takes(raw):
    assert _database_name(raw) == raw


@pytest.mark.parametrize("raw, says", [("push.v2", "'.'"), ("a/b", "'/'"), ("my push", "' '"), ("p$", "'\\$'"), ("a\\b", "'\\\\\\\\'"),
                                       ("a:b", "':'"), ("nul\0", "'\\\\x00'"), ("x" * 64, "fewer than 64 bytes"), ("é" * 32, "fewer than 64 bytes")])
def test_database_name_rejects_what_mongodb_refuses(raw, says):
    """The embedded store took any name (a/b made a folder in a folder); on MongoDB, pymongo refused
    some with an error naming no variable, and the server the others at the first write."""
    with pytest.raises(ValueError, match=says):
        _database_name(raw)


@pytest.mark.parametrize("raw", ["redis://127.0.0.1:6379/0", "amqp://guest:guest@rabbit//"])
def test_url_accepts_a_listed_scheme(raw):
    assert _url("redis", "amqp")(raw) == raw


@pytest.mark.parametrize("raw", ["http://127.0.0.1", "127.0.0.1:6379", "localhost"])
def test_url_rejects_other_schemes(raw):
    with pytest.raises(ValueError, match="is not one of redis, amqp"):
        _url("redis", "amqp")(raw)


@pytest.mark.parametrize("raw", ["redis://127.0.0.1:6379", "redis://127.0.0.1:6379/", "redis://:pw@host:6380/15", "rediss://h/2?ssl_cert_reqs=required",  # and failover lists:
                                 "amqp://guest:guest@rabbit:5672//", "unix:///run/redis.sock?db=1",
                                 "amqp://rabbit1:5672;amqp://rabbit2:5672", "redis://h1:6379/0;redis://h2:6379/0"])
def test_url_accepts_hosts_ports_and_databases_that_work(raw):
    assert _url("redis", "rediss", "amqp", "unix")(raw) == raw


@pytest.mark.parametrize("raw, says", [("redis://127.0.0.1:6379x/1", "Port could not be cast"), ("redis://127.0.0.1:70000/1", "out of range"),
                                       ("redis://127.0.0.1:6379/x", "the database '/x' is not a number"),
                                       ("amqp://guest@rabbit:56x72//", "Port could not be cast"),
                                       ("redis://h1:6379/0;redis://h2:63x79/0", "Port could not be cast"), ("redis://h1/0;http://h2/0", "scheme 'http'")])
def test_url_rejects_a_port_or_a_redis_database_that_is_not_a_number(raw, says):
    """redis-py raised a traceback that named no variable on a bad port, and read a database that
    is not a number as 0, the broker's."""
    with pytest.raises(ValueError, match=says):
        _url("redis", "amqp")(raw)


def test_a_tls_url_that_checks_the_servers_certificate_against_a_ca_file_passes(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    raw = f"rediss://push-app:p%40ss@cache:6380/1?ssl_cert_reqs=required&ssl_ca_certs={urllib.parse.quote(str(ca), safe='')}"
    assert _url("redis", "rediss")(raw) == raw
    assert _result_backend(raw) == raw


@pytest.mark.parametrize("query, says", [
    ("", "needs ssl_cert_reqs=required .* and none is given"),
    ("?ssl_ca_certs=%2Fetc%2Fssl%2Fcerts%2Fca-certificates.crt", "needs ssl_cert_reqs=required .* and none is given"),
    ("?ssl_cert_reqs=CERT_REQUIRED", "and it is 'CERT_REQUIRED'"),
    ("?ssl_cert_reqs=required&ssl_ca_certs=%2Fno%2Fsuch%2Fca.pem", "ssl_ca_certs='/no/such/ca.pem' is not a file"),
])
def test_a_tls_url_without_a_certificate_check_or_with_a_missing_ca_file_is_refused_saying_what_to_add(query, says):
    """Without ssl_cert_reqs kombu's broker connection checked no certificate (a warning only), and
    Celery's result backend refused the URL (the worker stopped at start, "Unrecoverable error"); a CA file that is not
    there failed each connection with an SSL error naming no variable."""
    text = failure({"SOME_VAR": f"rediss://:s3cret-pw@cache:6380/1{query}"}, convert=_url("redis", "rediss"), expected="a redis:// URL")
    assert re.search(says, text), text
    assert "SOME_VAR=" in text and "s3cret-pw" not in text


def test_mongodb_lists_of_hosts_pass():
    raw = "mongodb://u:p@db1:27017,db2:27017,db3:27017/push?replicaSet=rs0"
    assert _url("mongodb", "mongodb+srv")(raw) == raw


def test_a_bad_url_setting_error_names_variable_value_and_expected_form():
    text = failure({"SOME_VAR": "http://x"}, convert=_url("redis"), expected="a redis:// URL")

    assert "SOME_VAR='http://x' is not valid: expected a redis:// URL" in text


@pytest.mark.parametrize("raw", ["redis://127.0.0.1:6379/1", "rediss://:pw@host:6380/2?ssl_cert_reqs=required", "rpc://", "db+postgresql://u:p@db/results",
                                 "cache+memcached://127.0.0.1:11211/", "mongodb://a:27017,b:27017/results", "disabled://"])
def test_result_backend_accepts_what_celery_reads(raw):
    assert _result_backend(raw) == raw


@pytest.mark.parametrize("raw, says", [
    ("redsi://127.0.0.1:6379/1", "Celery has no result backend 'redsi'"),
    ("foo+bar://x", "Celery has no result backend 'foo'"),
    ("127.0.0.1:6379", "no scheme"),
    ("redis://127.0.0.1:6379x/1", "Port could not be cast"),
    ("redis://127.0.0.1:6379/results", "is not a number"),
])
def test_result_backend_refuses_what_celery_cannot_use_saying_why(raw, says):
    with pytest.raises(ValueError, match=says):
        _result_backend(raw)


def test_the_result_backend_schemes_are_celerys():
    from celery.app.backends import BACKEND_ALIASES

    assert RESULT_BACKEND_SCHEMES == set(BACKEND_ALIASES)


@pytest.mark.parametrize("raw", ["redis://:s3cret-pw@127.0.0.1:6379x/0", "amqp://u:s3cret-pw@h:5672;redis://:s3cret-pw@h:bad/0",
                                 "redsi://:s3cret-pw@127.0.0.1:6379/1"])
def test_a_bad_url_setting_error_does_not_show_its_password(raw):
    message = failure({"SOME_VAR": raw}, convert=_result_backend if raw.startswith("redsi") else _url("redis", "amqp"))
    assert "s3cret-pw" not in message and "***" in message, message


def test_choice_accepts_a_listed_value():
    assert _choice("development", "production")("production") == "production"


@pytest.mark.parametrize("raw", ["staging", "Production", " production"])
def test_choice_rejects_anything_not_listed_exactly(raw):
    with pytest.raises(ValueError, match="not one of development, production"):
        _choice("development", "production")(raw)


def test_origins_split_on_commas_and_trim_spaces_and_trailing_slashes():
    assert _origins(" https://a.example/ , http://b.example:8080") == ("https://a.example", "http://b.example:8080")


def test_origins_skip_empty_parts():
    assert _origins("https://a.example,, ,") == ("https://a.example",)


def test_origins_star_stays_a_star():
    assert _origins("*") == ("*",)


def test_origins_are_read_as_browsers_send_them_lower_case_without_the_scheme_s_default_port():
    assert _origins("https://App.Example.com:443, http://localhost:80, http://localhost:8080, chrome-extension://abc") == (
        "https://app.example.com", "http://localhost", "http://localhost:8080", "chrome-extension://abc")


def test_an_origin_s_port_is_read_as_the_number_a_browser_writes():
    assert _origins("https://app.example.com:08443, https://app.example.com:, http://[::1]:80, http://[::1]:8080") == (
        "https://app.example.com:8443", "https://app.example.com", "http://[::1]", "http://[::1]:8080")


@pytest.mark.parametrize("raw", ["app.example.com", "localhost:8080", "https://app.example.com/chat", "https://app.example.com?x=1",
                                 "https://user@app.example.com", "https://app.example.com:44x", ",", " , ",
                                 "https://bücher.example"])
def test_an_origin_no_browser_sends_stops_the_process_instead_of_refusing_every_browser_with_403(raw):
    text = failure({"SOME_VAR": raw}, convert=_origins, expected="a comma-separated list of origins such as https://app.example.com, or *")
    assert text.startswith(f"SOME_VAR={raw!r} is not valid: expected a comma-separated list of origins"), text


# --- redact -----------------------------------------------------------------------------------


def test_redact_hides_a_password_without_a_user():
    assert redact("redis://:secret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"


def test_redact_hides_a_password_and_keeps_the_user():
    assert redact("amqp://guest:hunter2@rabbit:5672//") == "amqp://guest:***@rabbit:5672//"


def test_redacted_text_never_contains_the_password():
    assert "s3cr3t-pw" not in redact("mongodb://app:s3cr3t-pw@db1:27017,db2:27017/push?replicaSet=rs0")


@pytest.mark.parametrize("url, secret", [
    ("mongodb://app@db1:27017/push?tls=true&tlsCertificateKeyFilePassword=key-file-pw", "key-file-pw"),
    ("mongodb://db1/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:aws-session-token", "aws-session-token"),
    ("rediss://db1:6380/0?ssl_password=ssl-key-pw", "ssl-key-pw"),
], ids=["tls key file password", "aws session token", "redis ssl_password"])
def test_redact_hides_passwords_and_tokens_in_query_parameters(url, secret):
    """MongoDB's URI options carry a TLS key file's password and MONGODB-AWS's session token, and
    redis-py's an SSL key's password; the worker logs MONGO_URL at start (and its errors name it),
    every process its Redis and broker URLs."""
    shown = redact(url)
    assert secret not in shown and "***" in shown, shown
    assert shown.split("?")[0] == url.split("?")[0]


def test_redact_leaves_a_url_without_a_password_unchanged():
    assert redact("redis://127.0.0.1:6379/1") == "redis://127.0.0.1:6379/1"


def test_redact_leaves_a_url_with_only_a_user_unchanged():
    assert redact("amqp://guest@rabbit:5672//") == "amqp://guest@rabbit:5672//"


@pytest.mark.parametrize("url, shown", [
    ("rpc://", "rpc://"),
    ("db+sqlite:///results.db", "db+sqlite:///results.db"),
    ("unix:///run/redis.sock?db=1&password=secret", "unix:///run/redis.sock?db=1&password=***"),
], ids=["rpc", "sqlite", "unix socket with a password"])
def test_redact_keeps_the_slashes_of_a_url_without_a_host(url, shown):
    """A URL with an empty host was logged without its "//" (the worker's "results rpc:", a node's
    "redis unix:/run/redis.sock"): urlunsplit drops an empty netloc, so the log named another URL."""
    assert redact(url) == shown


def test_redact_keeps_query_and_path():
    assert redact("mongodb://u:p@h:27017/db?authSource=admin") == "mongodb://u:***@h:27017/db?authSource=admin"



def test_redact_hides_a_password_given_in_the_query_string():
    assert "secret" not in redact("unix:///tmp/redis.sock?db=1&password=secret")


# --- cross-checks at import ---------------------------------------------------------------------


def test_a_ping_timeout_longer_than_the_interval_stops_the_import_with_the_fix():
    import os
    import subprocess
    import sys

    env = dict(os.environ, PING_INTERVAL="10", PING_TIMEOUT="15")
    done = subprocess.run([sys.executable, "-c", "import settings"], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode != 0
    assert "PING_TIMEOUT=15 is longer than PING_INTERVAL=10: set it to at most the interval" in done.stderr


# --- the module's own checks, in a fresh interpreter ------------------------------------------------


@pytest.mark.parametrize(("env", "says"), [
    ({"MAX_MESSAGE_BYTES": "3000000"}, "MAX_MESSAGE_BYTES=3000000 is over 2000000"),
    ({"MAX_FRAME_BYTES": "1000"}, "MAX_FRAME_BYTES=1000 is under 2560: a browser's refresh frame carries a whole token"),
    ({"REPLAY_MAX_BYTES": "65593"}, "REPLAY_MAX_BYTES=65593 is under one message's largest frame, MAX_MESSAGE_BYTES=65536 plus 58: "
                                    "a replay could not carry its newest message; set it to at least 65594"),
    ({"REPLAY_MAX_BYTES": "4096", "MAX_MESSAGE_BYTES": "4096"}, "REPLAY_MAX_BYTES=4096 is under one message's largest frame, MAX_MESSAGE_BYTES=4096 plus 58"),
    ({"REPLAY_MAX_BYTES": "16MB"}, "REPLAY_MAX_BYTES='16MB' is not valid: expected a whole number of bytes"),
    ({"REDELIVER_ATTEMPTS": "1100"}, "REDELIVER_ATTEMPTS=1100 is too many for REDELIVER_AFTER=30: the last redelivery would come at an age of 30 x 2^1099 seconds, over 100000000; set it to at most 22"),
    ({"REDELIVER_ATTEMPTS": "12", "REDELIVER_AFTER": "50000"}, "REDELIVER_ATTEMPTS=12 is too many for REDELIVER_AFTER=50000: the last redelivery would come at an age of 50000 x 2^11 seconds, over 100000000; set it to at most 11"),
    ({"RESUME_OVERLAP_MS": "-5"}, "RESUME_OVERLAP_MS='-5' is not valid: expected a whole number of milliseconds (must be 0 or greater, and at most 100000000000)"),
    ({"HOUSEKEEPING_SECONDS": "inf"}, "HOUSEKEEPING_SECONDS='inf' is not valid: expected a number of seconds (must be greater than 0 and at most 100000000)"),
    ({"MAX_USER_CONNECTS": "30"}, "MAX_USER_CONNECTS='30' is not valid: expected 0 (no limit) or COUNT/SECONDS, two whole numbers: "
                                  "30/60 is at most 30 connects of one user in any 60 seconds (no '/' between the count and the seconds)"),
    ({"AUTH_CACHE_SECONDS": "-5"}, "AUTH_CACHE_SECONDS='-5' is not valid"),
    ({"AUTH_CACHE_SECONDS": "nan"}, "AUTH_CACHE_SECONDS='nan' is not valid"),
    ({"RESULT_BACKEND": "reids://127.0.0.1:6379/1"}, "RESULT_BACKEND='reids://127.0.0.1:6379/1' is not valid: expected a Celery result backend URL (Celery has no result backend 'reids'"),
])
def test_a_setting_out_of_its_range_stops_the_import_saying_which(env, says):
    done = subprocess.run([sys.executable, "-c", "import settings"], cwd=Path(__file__).resolve().parents[2], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and says in done.stderr, done.stderr[-500:]


@pytest.mark.parametrize("key", ["a-long-admin-key-read-from-a-secret-file-0123456789\n", " a-long-admin-key-0123456789-abcdefghijklmnop", "\ta-long-admin-key-after-a-tab-0123456789"])
def test_an_admin_key_with_whitespace_around_it_stops_the_import_naming_it_without_showing_it(key):
    done = subprocess.run([sys.executable, "-c", "import settings"], cwd=Path(__file__).resolve().parents[2], env={**os.environ, "AUTH_ADMIN_KEY": key},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "AUTH_ADMIN_KEY starts or ends with whitespace" in done.stderr and "remove the whitespace" in done.stderr, done.stderr[-500:]
    assert key.strip() not in done.stderr


@pytest.mark.parametrize("key", ["clé-d-administration-0123456789-abcdefgh", "admin-key-0123456789-abcdefghijklmnop-秘密"])
def test_an_admin_key_that_is_not_ascii_stops_the_import_naming_it_without_showing_it(key):
    # Tornado reads header bytes as Latin-1: such a key matched the Authorization header of a
    # client that sends Latin-1 (Python's http.client, for the first key; none for the second) and
    # never that of one that sends UTF-8 (curl, Go, Node), which got 401 with the right key.
    done = subprocess.run([sys.executable, "-c", "import settings"], cwd=Path(__file__).resolve().parents[2], env={**os.environ, "AUTH_ADMIN_KEY": key},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "AUTH_ADMIN_KEY holds characters outside ASCII" in done.stderr, done.stderr[-500:]
    assert key not in done.stderr


@pytest.mark.parametrize("command", [["-m", "wsnode", "--port", "70000"], ["-m", "demo", "--port", "0"], ["cluster.py", "--flower-port", "65536"]],
                         ids=["node", "demo", "cluster"])
def test_a_port_option_outside_1_to_65535_is_refused_by_the_command_line(command):
    """A node given --port 70000 listened on 4464 (the socket takes it modulo 65536) while it
    advertised, and named its queue, 127.0.0.1:70000; cluster.py raised OverflowError."""
    done = subprocess.run([sys.executable, *command], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "is not a TCP port: give a whole number between 1 and 65535" in done.stderr, done.stderr[-500:]


@pytest.mark.parametrize("raw", ["redis+socket:///run/redis/redis.sock", "redis+socket:///run/redis/redis.sock?virtual_host=1"])
def test_result_backend_accepts_celerys_redis_unix_socket_url(raw):
    """Celery's Redis backend reads ``redis+socket:///path`` (a Unix socket); it was refused."""
    assert _result_backend(raw) == raw


@pytest.mark.parametrize("raw", ["redis://:s3cr#etpw@127.0.0.1:6379/0", "redis://u:s3cr/etpw@127.0.0.1:6379/0", "redis://:s3cr?etpw@h:6379/1",
                                 "redis://u:6380/s3cretpw@h:6379/1", "amqp://u:s3cr#etpw@rabbit:5672//"])
def test_a_url_whose_password_holds_a_character_that_ends_the_host_does_not_show_it(raw):
    """A password with an unescaped ``#``, ``/`` or ``?`` is the usual cause of this very error
    (urlsplit reads what follows as the port, path, query or fragment): neither the value shown
    nor the converter's explanation may hold any of it."""
    message = failure({"SOME_VAR": raw}, convert=_url("redis", "amqp"))
    secret = raw.partition("://")[2].rpartition("@")[0].partition(":")[2]
    assert not any(piece in message for piece in secret.replace("#", "/").replace("?", "/").split("/") if piece), message
    assert "***" in message and "percent-encode" in message, message


# --- previous secrets and admin keys (rotation) ---------------------------------------------------

CURRENT = "current-secret-0123456789-abcdefghijklmnop"
OLD = "old-secret-0123456789-abcdefghijklmnopqrstu"
OLDER = "older-secret-0123456789-abcdefghijklmnopqrs"


def previous(raw: str | None, admin_key: bool = False) -> tuple[str, ...]:
    return _secret_list({} if raw is None else {"AUTH_SECRET_PREVIOUS": raw}, "AUTH_SECRET_PREVIOUS", CURRENT, admin_key)


def test_no_previous_secret_by_default():
    assert previous(None) == previous("") == ()


def test_previous_secrets_are_split_on_commas_in_order():
    assert previous(OLD) == (OLD,)
    assert previous(f"{OLD},{OLDER}") == (OLD, OLDER)


def test_previous_secrets_skip_empty_items_repeats_and_the_current_secret():
    assert previous(f",{OLD},,{OLD},{CURRENT},{OLDER},") == (OLD, OLDER)


def test_a_previous_secret_keeps_every_character_but_the_comma():
    assert previous("o;ld= secret+/\\é") == ("o;ld= secret+/\\é",)


@pytest.mark.parametrize("raw, which", [(f"{OLD}, {OLDER}", "AUTH_SECRET_PREVIOUS item 2 of 2"), (f"{OLD}\n", "AUTH_SECRET_PREVIOUS starts")])
def test_a_previous_secret_with_whitespace_around_it_is_refused_naming_its_place_without_showing_it(raw, which):
    with pytest.raises(SettingsError) as caught:
        previous(raw)

    assert which in str(caught.value) and "separate the items with commas alone" in str(caught.value)
    assert OLD not in str(caught.value) and OLDER not in str(caught.value)


def test_a_previous_admin_key_outside_ascii_is_refused_but_a_previous_secret_is_not():
    with pytest.raises(SettingsError, match="outside ASCII"):
        previous("clé-d-administration-0123456789-abcdefgh", admin_key=True)
    assert previous("clé-0123456789-abcdefghijklmnopqrstuvwxyz") == ("clé-0123456789-abcdefghijklmnopqrstuvwxyz",)


def test_every_secret_given_is_named_for_the_checks():
    named = named_secrets(CURRENT, "k" * 40, (OLD, OLDER), ("p" * 40,))

    assert [name for name, _, _ in named] == ["AUTH_SECRET", "AUTH_ADMIN_KEY", "AUTH_SECRET_PREVIOUS item 1 of 2", "AUTH_SECRET_PREVIOUS item 2 of 2",
                                              "AUTH_ADMIN_KEY_PREVIOUS"]


def test_long_random_secrets_have_no_problem():
    assert secret_problems(named_secrets(CURRENT, "k" * 40, (OLD, OLDER), ("p" * 40,))) == []


def test_a_short_or_development_previous_secret_or_admin_key_is_a_problem_as_the_current_ones_are():
    problems = secret_problems(named_secrets(CURRENT, "k" * 40, (OLD, "short"), (DEV_AUTH_ADMIN_KEY,)))

    assert problems == ["AUTH_ADMIN_KEY_PREVIOUS still hold the development value",
                        "AUTH_SECRET_PREVIOUS item 2 of 2 has 5 bytes, under the 32 a secret needs"]
    assert secret_problems(named_secrets(CURRENT, "k" * 40, (DEV_AUTH_SECRET,))) == ["AUTH_SECRET_PREVIOUS still hold the development value"]


def test_a_signing_secret_that_is_also_an_admin_key_is_a_problem():
    assert secret_problems(named_secrets(CURRENT, CURRENT)) == [
        "AUTH_SECRET and AUTH_ADMIN_KEY hold the same value (a signing secret must not be an admin key, which every business "
        "backend holds: it could sign tokens itself)"]
    problems = secret_problems(named_secrets(CURRENT, "k" * 40, (OLD,), (OLD,)))
    assert len(problems) == 1 and problems[0].startswith("AUTH_SECRET_PREVIOUS and AUTH_ADMIN_KEY_PREVIOUS hold the same value")


def test_the_previous_secrets_and_admin_keys_are_read_from_the_environment_at_import():
    env = {**os.environ, "AUTH_SECRET": CURRENT, "AUTH_SECRET_PREVIOUS": f"{OLD},{OLDER}", "AUTH_ADMIN_KEY": "k" * 40, "AUTH_ADMIN_KEY_PREVIOUS": "p" * 40}
    done = subprocess.run([sys.executable, "-c", "import settings; print((settings.AUTH_SECRET_PREVIOUS, settings.AUTH_ADMIN_KEY_PREVIOUS))"],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=60)

    assert done.stdout.strip() == str(((OLD, OLDER), ("p" * 40,))), done.stderr[-500:]


def test_a_previous_admin_key_with_whitespace_stops_the_import_naming_it_without_showing_it():
    done = subprocess.run([sys.executable, "-c", "import settings"], cwd=Path(__file__).resolve().parents[2],
                          env={**os.environ, "AUTH_ADMIN_KEY_PREVIOUS": f"{'p' * 40}, {'q' * 40}"}, capture_output=True, text=True, timeout=60)

    assert done.returncode != 0 and "AUTH_ADMIN_KEY_PREVIOUS item 2 of 2 starts or ends with whitespace" in done.stderr, done.stderr[-500:]
    assert "p" * 40 not in done.stderr and "q" * 40 not in done.stderr


def test_collect_order_is_user_unless_set_to_none():
    """Read in a fresh interpreter: ``settings`` reads the environment once, at import."""
    def order(value):
        env = {k: v for k, v in os.environ.items() if k != "COLLECT_ORDER"} | ({"COLLECT_ORDER": value} if value is not None else {})
        return subprocess.run([sys.executable, "-c", "import settings; print(settings.COLLECT_ORDER)"], cwd=Path(__file__).resolve().parents[2],
                              env=env, capture_output=True, text=True, timeout=60)
    assert order(None).stdout.strip() == "user"
    assert order("none").stdout.strip() == "none"
    bad = order("per-user")
    assert bad.returncode != 0 and "COLLECT_ORDER='per-user' is not valid: expected user or none" in bad.stderr
