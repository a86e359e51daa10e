from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, UTCDateTime


class Owner(Base):
    """Who a budget belongs to besides a key (SPEC 11): a team, a user (a person who owns
    keys), an end user (the caller's own customer, named per request) or a tag.

    One table for the four: they have the same life (create, read, change, delete, reset their
    budgets) and the request path looks them up the same way. `scope` is empty for teams, users
    and tags; an end user's is the team (`team:<id>`) or, for a key without a team, the key
    (`key:<id>`) it was seen under, so the same `user` string under two teams is two end users.
    """

    __tablename__ = "owners"
    __table_args__ = (UniqueConstraint("kind", "scope", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # team | user | end_user | tag
    scope: Mapped[str] = mapped_column(String(64), default="")
    name: Mapped[str] = mapped_column(String(255))  # alias; an end user's id; a tag
    # Teams: the budgets each of its end users gets on first sight (a list of budget settings).
    end_user_budget: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON(none_as_null=True))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
