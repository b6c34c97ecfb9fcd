"""``launcher.free_port``: a port the tests' and the benchmarks' servers then bind, which no
outgoing connection may take meanwhile."""

from __future__ import annotations

import socket

import launcher


def test_a_free_port_lies_below_the_kernels_ephemeral_range_where_no_outgoing_connection_takes_it():
    """A port the OS picks (bind to port 0) comes from the ephemeral range, where any outgoing
    connection on the machine may take it between its release and the server's bind (seen: a push
    node of a test run exiting with ``Address already in use``)."""
    low, high = launcher.ephemeral_ports()
    ports = {launcher.free_port() for _ in range(50)}
    assert all(1024 <= port < low for port in ports), sorted(p for p in ports if not 1024 <= p < low)
    assert len(ports) > 40  # picked at random, not one port over and over
    for port in list(ports)[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free indeed


def test_the_ephemeral_range_is_read_from_the_kernel_or_taken_as_linuxs_default(tmp_path):
    path = tmp_path / "ip_local_port_range"
    path.write_text("40000\t50000\n")
    assert launcher.ephemeral_ports(path) == (40000, 50000)
    assert launcher.ephemeral_ports(tmp_path / "missing") == (32768, 60999)
    path.write_text("garbage\n")
    assert launcher.ephemeral_ports(path) == (32768, 60999)


def test_with_no_room_below_the_ephemeral_range_the_os_picks(tmp_path):
    path = tmp_path / "ip_local_port_range"
    path.write_text("1024\t65535\n")
    port = launcher.free_port(path)
    assert 1024 <= port <= 65535
