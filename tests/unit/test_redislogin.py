"""What a process says when Redis refuses its login (``redislogin``): a refusal told apart from an
outage, and one line naming the variables, their URLs without the password, and the fix."""

from __future__ import annotations

import ssl

from redis.exceptions import AuthenticationError, ConnectionError, NoPermissionError, TimeoutError

import redislogin

URL = "redis://push-app:s3cret%40pw@cache:6379/1"


def test_a_wrong_password_is_a_refusal_and_its_line_names_the_variable_without_the_password():
    kind = redislogin.refusal(URL, AuthenticationError("invalid username-password pair or user is disabled."))
    line = redislogin.message([("REDIS_URL", URL, *kind)])
    assert kind[0] == "password"
    assert line.startswith("Redis refused the user name and password of REDIS_URL (redis://push-app:***@cache:6379/1)")
    assert "s3cret" not in line and "\n" not in line and "%40" in line  # how to write an @ in it


def test_a_missing_password_is_told_as_such():
    kind = redislogin.refusal("redis://cache:6379/1", AuthenticationError("Authentication required."))
    assert kind[0] == "no password"
    assert "REDIS_URL (redis://cache:6379/1) gives none" in redislogin.message([("REDIS_URL", "redis://cache:6379/1", *kind)])


def test_variables_refused_alike_are_named_together_once():
    kind = redislogin.refusal(URL, AuthenticationError("invalid username-password pair or user is disabled."))
    line = redislogin.message([("REDIS_URL", URL, *kind), ("BROKER_URL", URL.replace("/1", "/0"), *kind)])
    assert "REDIS_URL (redis://push-app:***@cache:6379/1) and BROKER_URL (redis://push-app:***@cache:6379/0)" in line
    assert line.count("percent-encode") == 1


def test_an_acl_user_without_ping_and_a_certificate_that_does_not_verify_are_refusals():
    kind = redislogin.refusal(URL, NoPermissionError("this user has no permissions to run the 'info' command"))
    assert kind[0] == "permission"
    assert "+info" in redislogin.message([("REDIS_URL", URL, *kind)])
    try:
        try:
            raise ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
        except ssl.SSLError as exc:
            raise ConnectionError("Error 1 connecting to cache:6380. [SSL: CERTIFICATE_VERIFY_FAILED] ...") from exc
    except ConnectionError as exc:
        kind = redislogin.refusal("rediss://cache:6380/1?ssl_cert_reqs=required", exc)
    assert kind[0] == "certificate"
    assert "set ssl_ca_certs in the URL" in redislogin.message([("REDIS_URL", "rediss://cache:6380/1?ssl_cert_reqs=required", *kind)])


def test_redis_down_or_slow_is_no_refusal():
    assert redislogin.refusal(URL, ConnectionError("Error 111 connecting to cache:6379. Connection refused.")) is None
    assert redislogin.refusal(URL, TimeoutError("Timeout connecting to server")) is None


def test_a_wrong_password_given_as_a_query_parameter_is_not_told_as_a_missing_one():
    """redis-py also reads ``?password=`` (settings.redact masks it): a wrong one there was told as
    "REDIS_URL gives none", sending the reader to add a password the URL has."""
    url = "redis://cache:6379/1?password=wrong"
    kind = redislogin.refusal(url, AuthenticationError("invalid username-password pair or user is disabled."))
    assert kind[0] == "password"
    assert "wrong" not in redislogin.message([("REDIS_URL", url, *kind)])


def test_at_run_time_a_refusal_wrapped_by_kombu_is_told_for_the_variables_named_and_an_outage_or_a_full_redis_is_not():
    from kombu.exceptions import OperationalError
    from redis.exceptions import OutOfMemoryError

    import settings

    try:
        try:
            raise AuthenticationError("invalid username-password pair or user is disabled.")
        except AuthenticationError as exc:
            raise OperationalError("invalid username-password pair or user is disabled.") from exc
    except OperationalError as wrapped:
        line = redislogin.refused(wrapped, ("BROKER_URL",))
    assert line is not None and f"BROKER_URL ({settings.redact(settings.BROKER_URL)})" in line and "REDIS_URL" not in line, line
    assert redislogin.refused(NoPermissionError("no permissions to run the 'evalsha' command")).startswith("the Redis user of REDIS_URL")
    assert redislogin.refused(ConnectionError("Connection refused")) is None
    assert redislogin.explain(ConnectionError("Connection refused")) == "Connection refused"
    full = OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    assert redislogin.explain(full).startswith("Redis is out of memory (maxmemory)")


def test_a_refusal_retold_keeps_its_type_so_it_is_retried_or_not_as_before_and_kombus_errors_are_the_brokers():
    from kombu.exceptions import OperationalError

    told = redislogin.retold(NoPermissionError("no permissions to run the 'evalsha' command"), ("REDIS_URL",))
    assert type(told) is NoPermissionError and str(told).startswith("the Redis user of REDIS_URL") and told.__cause__ is not None
    down = ConnectionError("Connection refused")
    assert redislogin.retold(down, ("REDIS_URL",)) is down
    assert redislogin.variables_of(OperationalError("x")) == ("BROKER_URL",)
    assert redislogin.variables_of(down, ("RESULT_BACKEND",)) == ("RESULT_BACKEND",)


def test_a_plain_url_to_a_tls_port_is_told_with_the_form_to_write_and_a_closed_port_speaks_no_tls():
    line = redislogin.message([("REDIS_URL", URL, "tls only", "Connection reset by peer")])
    assert line.startswith("the Redis of REDIS_URL (redis://push-app:***@cache:6379/1) serves TLS only")
    assert "rediss://...?ssl_cert_reqs=required&ssl_ca_certs=" in line and "s3cret" not in line
    import launcher
    assert not redislogin.speaks_tls(f"redis://127.0.0.1:{launcher.free_port()}/0")  # nothing listens: an outage, as before
