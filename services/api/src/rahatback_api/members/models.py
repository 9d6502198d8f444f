"""HTTP schemas for the members of an organization (the rows are auth's Membership and User)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from rahatback_api.auth.models import Role


class MemberPublic(BaseModel):
    user_id: str
    email: str
    role: Role
    created_at: datetime  # when they joined this organization


class MemberCreate(BaseModel):
    email: str = Field(min_length=3, max_length=320)
    role: Role = "viewer"
    password: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="initial password (12+ characters): always needed, used only if the email has no "
        "account yet (an existing account keeps its own)",
    )


class MemberUpdate(BaseModel):
    role: Role
