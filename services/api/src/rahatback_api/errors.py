"""One error type for everything a caller can cause, rendered by one handler."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError


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


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error_handler)
    app.add_exception_handler(IntegrityError, _integrity_error_handler)
