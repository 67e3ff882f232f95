"""The HTTP contract through real HTTP: settings enforced, one error shape, an honest schema.

A real Ray Serve app (one small seeded version) built from a ServingConfig object only: the API
key and the limits are set on the object, never in the environment, and every test checks that
the running replicas obey them.
"""

from __future__ import annotations

import json
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
from pydantic import SecretStr

from harness.faults_http import fault_replica_kill, fuzz, serve_app
from serving.api import ErrorBody
from serving.config import ServingConfig
from streams.broker import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "s3cret-key-from-the-settings-object"
MAX_K, MAX_HISTORY, MAX_BODY = 50, 300, 48 * 1024  # none of them the default


def test_replica_killed_under_load_is_replaced(tmp_path: Path) -> None:
    # First in the file: it runs its own Ray, before the module's app starts one.
    row = fault_replica_kill(tmp_path, quick=True)
    assert row["survived"], row
    assert row["recover_s"] is not None and row["requests_after_kill"] > 50, row
    assert row["failed_requests"] <= 8, row  # at most the 8 clients' requests in flight
    assert "gone: True" in row["detail"], row


@pytest.fixture(scope="module")
def live() -> Iterator[str]:
    cfg = ServingConfig(
        port=free_port(), replicas=1, api_key=KEY,  # type: ignore[arg-type]
        max_k=MAX_K, max_history=MAX_HISTORY, max_body_bytes=MAX_BODY,
    )  # fmt: skip
    mp = pytest.MonkeyPatch()
    mp.delenv("STREAMTUNE_SERVING__API_KEY", raising=False)  # the object is the only source
    mp.delenv("STREAMTUNE_SERVING__MAX_BODY_BYTES", raising=False)
    with tempfile.TemporaryDirectory() as tmp, serve_app(Path(tmp), cfg) as url:
        STATE["cfg"], STATE["registry"] = cfg, Path(tmp) / "registry"
        yield url
    mp.undo()


STATE: dict[str, Any] = {}
AUTH = {"x-api-key": KEY}
GOOD = {"history": ["item1", "item2"], "k": 5}


def post(url: str, body: Any = None, content: Any = None, **headers: str) -> httpx.Response:
    h = {"content-type": "application/json", **AUTH, **headers}
    return httpx.post(url, json=body, content=content, headers=h, timeout=30)


def assert_error_shape(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    ErrorBody.model_validate(body)
    assert body["detail"] and all(set(d) == {"loc", "msg", "type"} for d in body["detail"]), body


# -- settings enforced -------------------------------------------------------------------------


def test_api_key_from_settings_object_is_enforced(live: str) -> None:
    url = f"{live}/recommend"
    assert_error_shape(httpx.post(url, json=GOOD), 401)
    assert_error_shape(httpx.post(url, json=GOOD, headers={"x-api-key": "wrong"}), 401)
    # same length, same prefix, one byte off: still refused
    assert_error_shape(httpx.post(url, json=GOOD, headers={"x-api-key": KEY[:-1] + "X"}), 401)
    assert_error_shape(httpx.get(f"{live}/models"), 401)
    ok = httpx.post(url, json=GOOD, headers=AUTH)
    assert ok.status_code == 200 and len(ok.json()["items"]) == 5, ok.text
    assert httpx.get(f"{live}/models", headers=AUTH).status_code == 200
    # liveness and the contract stay public
    assert httpx.get(f"{live}/healthz").status_code == 200
    assert httpx.get(f"{live}/openapi.json").status_code == 200
    refused = httpx.post(url, json=GOOD, headers={"x-api-key": "wrong"}).text
    assert KEY not in refused


def test_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # The guard itself, in-process: every key check goes through hmac.compare_digest.
    import asyncio

    import serving.http_guard as guard

    calls: list[tuple[bytes, bytes]] = []
    real = guard.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(guard.hmac, "compare_digest", spy)
    reached: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    g = guard.HTTPGuard(app, 1024, SecretStr(KEY), frozenset({"/healthz"}))
    assert KEY not in repr(g)

    def call(key: bytes) -> int:
        sent: list[Any] = []
        scope = {"type": "http", "path": "/recommend", "headers": [(b"x-api-key", key)]}

        async def receive() -> Any:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(m: Any) -> None:
            sent.append(m)

        asyncio.run(g(scope, receive, send))
        return int(sent[0]["status"])

    assert call(b"nope") == 401 and call(KEY.encode()) == 200
    assert calls == [(b"nope", KEY.encode()), (KEY.encode(), KEY.encode())]
    assert reached == [b"{}"]


def test_chunked_body_over_the_limit_gets_413(live: str) -> None:
    def chunks() -> Iterator[bytes]:  # no content-length: httpx sends it chunked
        yield b'{"history": ['
        for _ in range(MAX_BODY // 960 + 4):
            yield b'"item1",' * 120
        yield b'"item1"]}'

    r = post(f"{live}/recommend", content=chunks())
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in r.request.headers
    assert_error_shape(r, 413)
    # a small chunked body passes the guard and is answered
    ok = post(f"{live}/recommend", content=iter([b'{"history": ["item1"],', b' "k": 3}']))
    assert ok.status_code == 200 and len(ok.json()["items"]) == 3, ok.text


def test_body_limit_comes_from_the_settings(live: str) -> None:
    # Under the 64 KiB default, over the configured 48 KiB: refused from content-length alone.
    body = json.dumps({"history": ["item1"] * ((MAX_BODY + 4000) // 9)}).encode()
    assert MAX_BODY < len(body) < 64 * 1024
    assert_error_shape(post(f"{live}/recommend", content=body), 413)


def test_body_longer_than_its_content_length_header_is_refused(live: str) -> None:
    # A lying header: declares a small body, then sends a large one on the same connection.
    host, port = live.removeprefix("http://").split(":")
    big = b'{"history": [' + b'"item1",' * (MAX_BODY // 8 + 100) + b'"item1"]}'
    head = (
        f"POST /recommend HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"X-API-Key: {KEY}\r\nContent-Length: 20\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head + big)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    # the server reads 20 bytes (not JSON) and must not act on the rest: a 4xx, never a 2xx
    assert 400 <= status < 500, reply[:300]


# -- the schema states the rules ---------------------------------------------------------------


@pytest.fixture(scope="module")
def schema(live: str) -> dict[str, Any]:
    r = httpx.get(f"{live}/openapi.json")
    assert r.status_code == 200
    s: dict[str, Any] = r.json()
    return s


def validator(schema: dict[str, Any], name: str) -> Any:
    doc = {"$ref": f"#/components/schemas/{name}", "components": schema["components"]}
    return jsonschema_rs.validator_for(doc)


def test_schema_states_the_limits_from_the_settings(schema: dict[str, Any]) -> None:
    req = schema["components"]["schemas"]["RecommendRequest"]["properties"]
    assert req["k"]["maximum"] == MAX_K and req["k"]["minimum"] == 1
    arrays = [b for b in req["history"]["anyOf"] if b.get("type") == "array"]
    assert arrays and arrays[0]["maxItems"] == MAX_HISTORY
    score = schema["components"]["schemas"]["ScoreRequest"]["properties"]
    assert score["items"]["maxItems"] == MAX_HISTORY
    assert schema["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"


def test_empty_request_is_invalid_in_the_schema_and_refused(
    live: str, schema: dict[str, Any]
) -> None:
    v = validator(schema, "RecommendRequest")
    for body in ({}, {"k": 5}, {"user_id": None}, {"history": None, "user_id": None}):
        assert not v.is_valid(body), body
        assert_error_shape(post(f"{live}/recommend", body), 422)
    for body in ({"user_id": "u1"}, {"history": []}, {"history": ["item1"], "user_id": None}):
        assert v.is_valid(body), body
        assert post(f"{live}/recommend", body).status_code == 200, body
    s = validator(schema, "ScoreRequest")
    assert not s.is_valid({"items": ["item1"]})
    assert_error_shape(post(f"{live}/score", {"items": ["item1"]}), 422)


def test_limits_in_the_schema_are_the_limits_enforced(live: str, schema: dict[str, Any]) -> None:
    v = validator(schema, "RecommendRequest")
    at, over = {"history": ["item1"], "k": MAX_K}, {"history": ["item1"], "k": MAX_K + 1}
    assert v.is_valid(at) and post(f"{live}/recommend", at).status_code == 200
    assert not v.is_valid(over)
    assert_error_shape(post(f"{live}/recommend", over), 422)
    long = {"history": ["item1"] * (MAX_HISTORY + 1)}
    assert not v.is_valid(long)
    assert_error_shape(post(f"{live}/recommend", long), 422)
    # JSON Schema's integer includes 7.0: accepted; "7" is not an integer: refused
    assert post(f"{live}/recommend", {"history": ["item1"], "k": 7.0}).status_code == 200
    assert_error_shape(post(f"{live}/recommend", {"history": ["item1"], "k": "7"}), 422)


def test_every_status_returned_is_documented(schema: dict[str, Any]) -> None:
    ops = {(p, m): op for p, item in schema["paths"].items() for m, op in item.items()}
    for path in ("/recommend", "/score"):
        codes = set(ops[(path, "post")]["responses"])
        assert {"200", "400", "401", "413", "422", "500", "503"} <= codes, (path, codes)
    assert {"200", "413", "503"} <= set(ops[("/healthz", "get")]["responses"])
    assert "401" not in ops[("/healthz", "get")]["responses"]  # public
    assert {"200", "401", "413"} <= set(ops[("/models", "get")]["responses"])
    for (path, method), op in ops.items():
        for code, resp in op["responses"].items():
            if not code.startswith("2"):
                ref = resp["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/ErrorBody", (path, method, code)


# -- one error shape ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_kw", "status"),
    [
        ({"content": b"{not json"}, 422),
        ({"content": b""}, 422),
        ({"content": b"\xff\xfe{}"}, 422),  # read as UTF-16: not JSON
        ({"content": b'{"history": ["\xff"]}'}, 400),  # not UTF-8: no text to parse
        ({"body": {"history": "item1"}}, 422),
        ({"body": {"history": ["item1"], "surprise": True}}, 422),
        ({"body": {"history": ["item1"], "diversity": 2}}, 422),
        ({"body": {"history": ["item1"], "k": 10_000}}, 422),
        ({"body": GOOD, "x-api-key": "bad"}, 401),
    ],
)
def test_every_error_has_the_one_shape(live: str, request_kw: dict[str, Any], status: int) -> None:
    kw = dict(request_kw)
    headers = {"x-api-key": kw.pop("x-api-key")} if "x-api-key" in kw else {}
    r = post(f"{live}/recommend", kw.get("body"), kw.get("content"), **headers)
    assert_error_shape(r, status)


def test_framework_errors_have_the_one_shape_too(live: str) -> None:
    assert_error_shape(httpx.get(f"{live}/recommend", headers=AUTH), 405)
    assert_error_shape(httpx.get(f"{live}/nowhere", headers=AUTH), 404)


# -- fuzzing ------------------------------------------------------------------------------------


def test_fuzzing_the_live_contract_finds_nothing(live: str) -> None:
    res = fuzz(live, max_examples=200, api_key=KEY)
    assert res["cases"] >= 200, res
    assert res["server_errors"] == 0, res
    assert res["failures"] == [] and res["errors"] == [], res["failures"]
    # every check of schemathesis ran, the ones about rejected valid input included
    must_run = (
        "not_a_server_error", "positive_data_acceptance", "negative_data_rejection",
        "status_code_conformance", "response_schema_conformance", "ignored_auth",
    )  # fmt: skip
    for check in must_run:
        assert res["checks"].get(check, 0) > 0, (check, res["checks"])
    assert 401 in res["statuses"] and 422 in res["statuses"] and 200 in res["statuses"]


# -- last: it redeploys the module's app -------------------------------------------------------


def test_redeploy_with_another_key_takes_effect(live: str) -> None:
    # Serve does not compare init args; the settings are part of the deployment version, so a
    # new key reaches the replicas (e.g. `up` restarted against a running cluster).
    from ray import serve

    from serving.application import build_app
    from training.registry import Registry

    reg = Registry(STATE["registry"])
    champion = reg.champion()
    assert champion is not None
    cfg = STATE["cfg"].model_copy(update={"api_key": SecretStr("the-new-key")})
    serve.run(build_app(reg, cfg, champion), name=cfg.app_name, route_prefix="/")
    assert_error_shape(httpx.post(f"{live}/recommend", json=GOOD, headers=AUTH), 401)
    ok = httpx.post(f"{live}/recommend", json=GOOD, headers={"x-api-key": "the-new-key"})
    assert ok.status_code == 200, ok.text
