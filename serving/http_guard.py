"""A pure ASGI guard in front of the API: the API key and the body limit, before any parsing.

The limit counts the bytes as they arrive, so it holds however the body is sent: with a
content-length (checked up front, then counted, so a lying header does not help), or chunked
with none. The body is small by construction (<= the limit), so it is read here and replayed to
the app in one piece.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pydantic import SecretStr

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def error_body(status: int, msg: str, kind: str, loc: list[str | int] | None = None) -> bytes:
    """The one error shape (serving.api.ErrorBody), as bytes."""
    item = {"loc": loc or [], "msg": msg, "type": kind}
    return json.dumps({"detail": [item]}).encode()


class HTTPGuard:
    """401 for a missing or wrong X-API-Key (constant-time compare); 413 past ``max_body`` bytes."""

    def __init__(
        self, app: ASGIApp, max_body: int, api_key: SecretStr | None, public: frozenset[str]
    ) -> None:
        self.app, self.max_body, self.public = app, max_body, public
        # bytes, compared with hmac.compare_digest: timing does not leak how much matched
        self._key = api_key.get_secret_value().encode() if api_key is not None else None

    def __repr__(self) -> str:  # never the key
        return f"HTTPGuard(max_body={self.max_body}, api_key={'set' if self._key else 'unset'})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self._key is not None and scope.get("path", "") not in self.public:
            given = headers.get("x-api-key", b"")
            if not hmac.compare_digest(given, self._key):
                await _answer(send, 401, "missing or wrong X-API-Key", "unauthorized", ["header"])
                return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _answer(send, 413, self._too_large(int(declared)), "too_large", ["body"])
            return
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away: nothing to answer
                return
            body += msg.get("body", b"")
            if len(body) > self.max_body:
                await _answer(send, 413, self._too_large(len(body)), "too_large", ["body"])
                return
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # e.g. http.disconnect, for streaming responses

        await self.app(scope, replay, send)

    def _too_large(self, size: int) -> str:
        return f"body of at least {size} bytes exceeds the limit of {self.max_body}"


async def _answer(send: Send, status: int, msg: str, kind: str, loc: list[str | int]) -> None:
    payload = error_body(status, msg, kind, loc)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    if status == 401:
        headers.append((b"www-authenticate", b"ApiKey"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


class ReplicaTag:
    """Names the replica that answered in a response header (``REPLICA_HEADER``), so a client can
    tell replicas apart behind the balancer (e.g. to see when every replica has an event)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self._tag = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                msg["headers"] = [*msg.get("headers", []), self._tag]
            await send(msg)

        await self.app(scope, receive, tagged)


REPLICA_HEADER = "x-streamtune-replica"
