"""`streamtune status`'s serving line: what the app's /models answers, whatever it answers."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rich.console import Console

from services.cli_loop import _serving_status
from services.settings import Settings
from serving.config import ServingConfig
from streams.broker import free_port

ANSWER: dict[str, tuple[int, dict[str, object]]] = {}


class _Models(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = ANSWER["now"]
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def app_port() -> Iterator[int]:
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield port
    server.shutdown()


def _status(port: int) -> str:
    console = Console(record=True, width=200)
    _serving_status(Settings(serving=ServingConfig(port=port)), console)
    return console.export_text()


def test_before_a_first_version_the_status_says_what_the_app_answers(app_port: int) -> None:
    ANSWER["now"] = (503, {"detail": "no model version loaded yet"})
    assert "serving: answering 503" in _status(app_port)  # not a traceback


def test_a_serving_app_shows_its_versions_and_shards(app_port: int) -> None:
    shards = [{"shard": 0, "answering": True, "users": 12}, {"shard": 1, "answering": False}]
    ANSWER["now"] = (200, {"champion": 3, "serving": {"r1": 3}, "history_shards": shards})
    out = _status(app_port)
    assert "champion 3" in out and "12 users in 2 history shards (not answering: 1)" in out


def test_no_app_is_not_reachable() -> None:
    assert "serving: not reachable" in _status(free_port())
