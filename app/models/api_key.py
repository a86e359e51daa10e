from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, UTCDateTime


class ApiKey(Base):
    """A client credential. Only its SHA-256 hash and a short display prefix are stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    alias: Mapped[str | None] = mapped_column(String(255), index=True)
    mode: Mapped[str] = mapped_column(String(16))  # managed | passthrough
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | revoked
    models: Mapped[list[str]] = mapped_column(JSON, default=list)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Shrink to fit (SPEC 10) for this key; None: BUDGETGATE_SHRINK_TO_FIT decides.
    shrink_to_fit: Mapped[bool | None] = mapped_column(Boolean)
    # Its team and its user (SPEC 11): their budgets apply to its requests too.
    team_id: Mapped[str | None] = mapped_column(ForeignKey("owners.id"), index=True)
    user_id: Mapped[str | None] = mapped_column(ForeignKey("owners.id"), index=True)
    # For a key without a team: the budgets each of its end users gets on first sight.
    end_user_budget: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON(none_as_null=True))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
