"""Ports handed to test and benchmark servers stay out of the kernel's ephemeral range."""

from __future__ import annotations

import socket

from streams.broker import ephemeral_range, free_port


def test_free_ports_are_distinct_bindable_and_not_ephemeral() -> None:
    # A port from the ephemeral range could be taken by any client's outgoing connection
    # between the pick and the server's bind (seen: a Serve proxy failing to bind its port).
    low, high = ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert not any(low <= p <= high for p in ports)
    assert all(p >= 20_000 for p in ports)  # above Ray's default worker ports (10002-19999)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))
