"""Records every mutating request (POST/PUT/PATCH/DELETE) after its response, whatever the endpoint.

New endpoints are covered without touching them: the action is the matched route's name, the target
its last path parameter, the actor the principal `get_principal` left on the request state, and the
details the *names* of the body's fields (so a password change shows `settings.password`, never the
value). Endpoints with something to add (a login names the email tried) call `note_audit`.

The event is written in a transaction of its own after the request's has ended, so a failed request is
recorded too; a failure to write is logged and never changes the response. Requests without a valid
token are not recorded, except logins (which note themselves) and an agent's successful enrollment,
so that nobody can fill the table anonymously.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rahatback_api.audit import service
from rahatback_api.audit.client import Networks, client_address
from rahatback_api.audit.models import AuditEvent
from rahatback_api.db import session_scope

log = structlog.get_logger("rahatback_api.audit")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
BODY_LIMIT = 64 * 1024  # bodies larger than this are recorded without field names
_NOTE_KEY = "rahatback_audit"
_MAX_FIELDS = 50
_MAX_DEPTH = 3
_RESULT_ID_KEYS = ("id", "agent_id", "user_id")


def note_audit(request: Request, **fields: Any) -> None:
    """Add to or override this request's audit event: `action`, `org_id`, `actor_user_id`, `token_id`,
    `target_type`, `target_id`, `details` (merged). Never pass a secret: it would be stored."""
    notes: dict[str, Any] = request.scope.setdefault("state", {}).setdefault(_NOTE_KEY, {})
    details = {**notes.get("details", {}), **fields.pop("details", {})}
    notes.update(fields, details=details)


def field_names(body: object, prefix: str = "", depth: int = 1) -> list[str]:
    """Dotted key paths of a JSON object, without any value: {"settings": {"password": …}} →
    ["settings", "settings.password"]."""
    if not isinstance(body, dict):
        return []
    names: list[str] = []
    for key, value in body.items():
        name = f"{prefix}{str(key)[:100]}"
        names.append(name)
        if depth < _MAX_DEPTH:
            names.extend(field_names(value, f"{name}.", depth + 1))
    return sorted(names)[:_MAX_FIELDS]


def _json(data: bytes | bytearray, complete: bool) -> object:
    if not complete or not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def _kind(name: str) -> str:
    """`database_id` → `database`; `enrollment-tokens` → `enrollment-token`."""
    name = name.removesuffix("_id")
    return name[:-1] if name.endswith("s") and not name.endswith("ss") else name


class AuditMiddleware:
    def __init__(self, app: ASGIApp, trusted_proxies: Networks = ()) -> None:
        self.app = app
        self.trusted_proxies = trusted_proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING:
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})  # shared with every Request made for this scope
        request_body = bytearray()
        response_body = bytearray()
        status_code = 500
        response_is_json = False

        async def receive_and_keep() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(request_body) <= BODY_LIMIT:
                request_body.extend(message.get("body", b"")[: BODY_LIMIT + 1 - len(request_body)])
            return message

        async def send_and_keep(message: Message) -> None:
            nonlocal status_code, response_is_json
            if message["type"] == "http.response.start":
                status_code = message["status"]
                headers = dict(message.get("headers", []))
                response_is_json = headers.get(b"content-type", b"").startswith(b"application/json")
            elif (
                message["type"] == "http.response.body"
                and response_is_json
                and len(response_body) <= BODY_LIMIT
            ):
                response_body.extend(message.get("body", b"")[: BODY_LIMIT + 1 - len(response_body)])
            await send(message)

        try:
            await self.app(scope, receive_and_keep, send_and_keep)
        except Exception:
            await self._record(scope, 500, request_body, bytearray())
            raise
        await self._record(scope, status_code, request_body, response_body)

    async def _record(
        self, scope: Scope, status_code: int, request_body: bytearray, response_body: bytearray
    ) -> None:
        try:
            event = self._event(scope, status_code, request_body, response_body)
            if event is None:
                return
            sessionmaker: async_sessionmaker[AsyncSession] | None = getattr(
                scope["app"].state, "sessionmaker", None
            )
            if sessionmaker is None:
                return
            async with session_scope(sessionmaker) as session:
                await service.record(session, event)
        except Exception as exc:  # the request already happened: losing its record must not fail it
            log.warning(
                "audit event not recorded",
                method=scope.get("method"),
                path=scope.get("path"),
                error=type(exc).__name__,
            )

    def _event(
        self, scope: Scope, status_code: int, request_body: bytearray, response_body: bytearray
    ) -> AuditEvent | None:
        route = scope.get("route")
        if route is None:
            return None  # no endpoint matched (404/405): nothing happened to name
        state: dict[str, Any] = scope["state"]
        notes: dict[str, Any] = dict(state.get(_NOTE_KEY, {}))
        actor: dict[str, str] | None = state.get("audit_actor")
        path_params: dict[str, Any] = scope.get("path_params", {})
        response = _json(response_body, len(response_body) <= BODY_LIMIT)
        response_fields = response if isinstance(response, dict) and 200 <= status_code < 300 else {}
        if actor is None and not notes and "org_id" not in response_fields:
            # no valid token: only what an endpoint noted itself (logins) and successes that name
            # their organization (an agent's enrollment) are kept; recording the rest (malformed
            # bodies, bad proofs, 401/409/422/429) would let anyone fill the table
            return None
        result_key = next((k for k in _RESULT_ID_KEYS if k in response_fields), None)
        result_id = str(response_fields[result_key])[:200] if result_key else None

        target_type: str | None
        target_id: str | None
        if path_params:
            name, value = list(path_params.items())[-1]
            target_type, target_id = _kind(name), str(value)
        else:
            segments = [s for s in str(route.path).split("/") if s and not s.startswith("{")]
            named = result_key if result_key not in (None, "id") else (segments[-1] if segments else None)
            target_type, target_id = (_kind(named) if named else None), result_id
        details: dict[str, Any] = {}
        body = _json(request_body, len(request_body) <= BODY_LIMIT)
        if isinstance(body, dict):
            details["fields"] = field_names(body)
        if result_id is not None and result_id != target_id:
            details["result_id"] = result_id
        details.update(notes.pop("details", {}))

        org_id = actor["org_id"] if actor is not None else response_fields.get("org_id")
        event = AuditEvent(
            org_id=str(org_id)[:32] if org_id is not None else None,
            actor_user_id=actor["user_id"] if actor is not None else None,
            token_id=actor["token_id"] if actor is not None else None,
            action=str(getattr(route, "name", "") or scope["method"].lower())[:64],
            target_type=target_type[:64] if target_type else None,
            target_id=target_id[:200] if target_id else None,
            method=scope["method"],
            path=str(route.path)[:300],
            status_code=status_code,
            client_ip=client_address(scope, self.trusted_proxies),
            user_agent=_header(scope, b"user-agent")[:300] or None,
            details=details,
        )
        for key, value in notes.items():
            setattr(event, key, value)
        return event


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return ""
