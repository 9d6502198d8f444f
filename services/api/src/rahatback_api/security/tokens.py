"""Bearer tokens (API and enrollment): random, shown once, stored as SHA-256.

A fast hash is right here, unlike for passwords: the token is 32 random bytes (256 bits of entropy),
so there is nothing to brute-force and no need for a slow, salted KDF; SHA-256 lets us look a token
up by its hash with a unique index in one query.
"""

from __future__ import annotations

import hashlib
import secrets

API_TOKEN_PREFIX = "rbt_"  # noqa: S105 - a public marker that makes leaked tokens greppable
ENROLLMENT_TOKEN_PREFIX = "rbe_"  # noqa: S105 - public marker
DISPLAY_PREFIX_CHARS = 8


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
