"""Event → email/Slack text: one template pair (plain text + HTML) per event family.

The subject names what happened and to which database, so a person can triage from the inbox.
HTML templates are autoescaped (job and database names are user input); text ones are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2
from rahatback_contracts.messages import DomainEvent

__all__ = ["FAMILIES", "Rendered", "human_duration", "human_size", "render", "render_context"]

# event type → template family; every other type renders with the generic pair
FAMILIES: dict[str, str] = {
    "backup.completed": "backup_succeeded",
    "backup.partial": "backup_partial",
    "backup.failed": "backup_failed",
    "backup.overdue": "backup_overdue",
    "restore.completed": "restore_succeeded",
    "restore.failed": "restore_failed",
    "verify.failed": "verification_failed",
    "presence.offline": "agent_offline",
    "presence.online": "agent_online",
}

_SUBJECTS: dict[str, str] = {
    "backup_succeeded": "✅ Backup succeeded: {{ job_name }} ({{ database_name }})",
    "backup_partial": "⚠️ Backup PARTIAL: {{ job_name }} ({{ database_name }})",
    "backup_failed": "❌ Backup FAILED: {{ job_name }} ({{ database_name }})",
    "backup_overdue": "⏰ Backup overdue: {{ job_name }} ({{ database_name }})",
    "restore_succeeded": "✅ Restore succeeded: {{ database_name }}"
    "{% if job_name %} (from {{ job_name }}){% endif %}",
    "restore_failed": "❌ Restore FAILED: {{ database_name }}"
    "{% if job_name %} (from {{ job_name }}){% endif %}",
    "verification_failed": "❌ Verification FAILED: "
    "{{ job_name or 'backup ' ~ (backup_run_id or run_id or '') }}"
    "{% if database_name %} ({{ database_name }}){% endif %}",
    "agent_offline": "🔌 Agent offline: {{ agent_name }}",
    "agent_online": "🟢 Agent back online: {{ agent_name }}",
    "generic": "RahatBack: {{ type }}",
}

_NOT_DETAILS = frozenset({"schema_version", "type", "link", "error", "details"})
_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")
_SUBJECT_MAX = 200


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str


def human_size(size: int | None) -> str:
    if size is None:
        return "unknown"
    if size < 1024:
        return f"{size} B"
    value, unit = float(size), "B"
    for larger in _UNITS:
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:.1f} {unit}"


def human_duration(ms: int | None) -> str:
    if ms is None:
        return "unknown"
    if ms < 1000:
        return f"{ms} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _when(value: datetime | str | None, timezone: str | None = None) -> str:
    if value is None:
        return "never"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    utc = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if timezone and timezone != "UTC":
        try:
            local = value.astimezone(ZoneInfo(timezone))
        except (ZoneInfoNotFoundError, ValueError):
            return utc
        return f"{local:%Y-%m-%d %H:%M} {timezone} ({utc})"
    return utc


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("rahatback_notifier", "templates"),
        # autoescape by file name: .html escaped, .txt and the subject strings not
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=False),
        undefined=jinja2.Undefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["filesize"] = human_size
    env.filters["duration"] = human_duration
    env.filters["when"] = _when
    return env


_ENV = _environment()


def render_context(event: DomainEvent, data: dict[str, Any]) -> dict[str, Any]:
    """What the templates see: every field of the event (also fields of event types this notifier
    does not model yet, from the raw JSON), never the notification targets."""
    context = {key: value for key, value in data.items() if key != "notify"}
    context.update(event.model_dump(exclude={"notify"}))
    link = context.get("link")
    # only ever a web link in an email, whatever ended up in the event
    context["link"] = link if isinstance(link, str) and link.startswith(("https://", "http://")) else None
    # for the generic template (event types without their own): every field worth showing
    context["details"] = {
        key: value
        for key, value in context.items()
        if key not in _NOT_DETAILS and value is not None and value != [] and value != {}
    }
    return context


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _SUBJECT_MAX else line[: _SUBJECT_MAX - 1] + "…"


def render(event: DomainEvent, data: dict[str, Any]) -> Rendered:
    family = FAMILIES.get(event.type, "generic")
    context = render_context(event, data)
    subject = _ENV.from_string(_SUBJECTS[family]).render(context)
    return Rendered(
        subject=_one_line(subject),
        text=_ENV.get_template(f"{family}.txt").render(context),
        html=_ENV.get_template(f"{family}.html").render(context),
    )
