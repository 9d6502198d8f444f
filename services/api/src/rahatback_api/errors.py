"""One error type for everything a caller can cause, rendered by one handler."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError


class AppError(Exception):
    """An error the caller can fix; `message` says what to change."""

    def __init__(self, message: str, status_code: int = 400, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.field = field


class NotFound(AppError):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} not found", 404)


class Conflict(AppError):
    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, 409, field=field)


def app_error_body(exc: AppError) -> dict[str, object]:
    body: dict[str, object] = {"detail": exc.message}
    if exc.field is not None:
        body["field"] = exc.field
    return body


async def _app_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return JSONResponse(app_error_body(exc), status_code=exc.status_code, headers=headers)


async def _integrity_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # Services check uniqueness first; this catches the race where two requests insert at once.
    return JSONResponse({"detail": "conflicts with an existing resource"}, status_code=409)


APP_ERROR_SCHEMA: dict[str, Any] = {
    "title": "AppError",
    "type": "object",
    "properties": {
        "detail": {"type": "string", "title": "Detail"},
        "field": {"type": "string", "title": "Field"},
    },
    "required": ["detail"],
}


def _document_app_errors(app: FastAPI) -> None:
    """FastAPI documents each 422 as its own validation error (`detail`: a list); an AppError 422
    (`detail`: a message, `field`: what to fix) is one too. Say so in the OpenAPI schema, so clients
    (and the fuzzer in tests/api/test_fuzz.py) expect either."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()  # cached by FastAPI as app.openapi_schema: changed in place below
        schema.setdefault("components", {}).setdefault("schemas", {})["AppError"] = APP_ERROR_SCHEMA
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                response = operation.get("responses", {}).get("422")
                if response is None:
                    continue
                media = response.setdefault("content", {}).setdefault("application/json", {})
                fastapi_error = media.get("schema", {"$ref": "#/components/schemas/HTTPValidationError"})
                media["schema"] = {"anyOf": [fastapi_error, {"$ref": "#/components/schemas/AppError"}]}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _data_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # The database refused a value the request carried (PostgreSQL: a NUL character, a string longer
    # than its column; SQLSTATE class 22, "data exception"): the caller's to fix, not a server error.
    # The value is not echoed. Any other database error stays a 500.
    assert isinstance(exc, DBAPIError)
    if not isinstance(exc, DataError) and not str(getattr(exc.orig, "sqlstate", "") or "").startswith("22"):
        raise exc
    return JSONResponse(
        {
            "detail": "a value in this request cannot be stored: it is too long, out of range or contains "
            "a NUL character"
        },
        status_code=422,
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error_handler)
    app.add_exception_handler(IntegrityError, _integrity_error_handler)
    app.add_exception_handler(DBAPIError, _data_error_handler)
    _document_app_errors(app)
