"""What background code paths need besides a session, carried in `session.info`.

The sessionmaker is created with `info={APP_CONTEXT: AppContext(...)}` (see main.create_app), so a
report applied by a consumer can seal secrets for a prune command or a notification exactly like a
request handler, without threading the secret box through every call.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from rahatback_api.security.secretbox import SecretBox
from rahatback_api.security.signing import CommandSigner

APP_CONTEXT = "rahatback.app_context"


@dataclass(frozen=True)
class AppContext:
    box: SecretBox
    notifier_public_key: str | None
    public_url: str
    # signs every command to an agent (operations.service.enqueue_command)
    command_signer: CommandSigner | None = None


def app_context(session: AsyncSession) -> AppContext:
    ctx = session.info.get(APP_CONTEXT)
    if not isinstance(ctx, AppContext):
        raise RuntimeError(
            "this session was not made by the app's sessionmaker (no AppContext in session.info)"
        )
    return ctx
