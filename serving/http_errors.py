"""The one error shape of every non-2xx answer (``serving.api.ErrorBody``), however it arose."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response


def install_error_handlers(app: FastAPI) -> None:
    """Every non-2xx answer gets the one body shape, ErrorBody, whatever raised it."""

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        detail: Any = exc.detail  # limit_error passes the list form
        if not (isinstance(detail, list) and all(isinstance(d, dict) for d in detail)):
            kind = "bad_request" if exc.status_code == 400 else f"http_{exc.status_code}"
            detail = [{"loc": [], "msg": str(detail), "type": kind}]
        return JSONResponse({"detail": detail}, exc.status_code, headers=exc.headers)

    async def invalid(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        detail = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e["type"])}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, 422)

    async def crashed(_: Request, exc: Exception) -> Response:
        msg = f"internal error: {type(exc).__name__}"
        return JSONResponse({"detail": [{"loc": [], "msg": msg, "type": "internal"}]}, 500)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, crashed)


def limit_error(field: list[str | int], msg: str, kind: str) -> HTTPException:
    """A limit from the settings, broken: a 422 shaped like the schema's own validation errors."""
    return HTTPException(422, [{"loc": field, "msg": msg, "type": kind}])
