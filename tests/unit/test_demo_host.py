"""The demo API's check of the ``Host`` a request names (DNS rebinding)."""

from __future__ import annotations

import pytest

from demo.app import local_host


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "localhost:8080", "[::1]:8080", "10.0.0.5", "LOCALHOST"])
def test_an_ip_address_or_localhost_is_the_demo_opened_where_it_runs(host):
    assert local_host(host)


@pytest.mark.parametrize("host", ["evil.example:8080", "127.0.0.1.nip.io:8080", "[", "a]", ""])
def test_a_name_dns_could_point_here_is_refused(host):
    assert not local_host(host)
