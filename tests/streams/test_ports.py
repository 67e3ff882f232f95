"""Ports handed to test and benchmark servers stay out of the kernel's ephemeral range."""

from __future__ import annotations

import socket
from pathlib import Path

from streams.broker import free_port


def test_free_ports_are_distinct_bindable_and_not_ephemeral() -> None:
    # A port from the ephemeral range could be taken by any client's outgoing connection
    # between the pick and the server's bind (seen: a Serve proxy failing to bind its port).
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    low = int(ephemeral[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(10002 < p < low for p in ports)  # above Ray's worker ports too
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))
