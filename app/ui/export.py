"""The usage explorer's CSV: one row per group, exact dollars (every nano-dollar kept)."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

from app.ui.reads import UsageRow

MEASURES = ["requests", "rejections", "overruns", "prompt_tokens", "completion_tokens", "spend"]


def usage_csv_text(rows: list[UsageRow], group_by: str, aliases: dict[str, str | None]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    by_key = group_by == "key"
    writer.writerow([group_by, *(["alias"] if by_key else []), *MEASURES])
    for r in rows:
        writer.writerow(
            [r.group or ""]
            + ([aliases.get(r.group or "") or ""] if by_key else [])
            + [r.requests, r.rejections, r.overruns, r.prompt_tokens, r.completion_tokens]
            + [format(Decimal(r.spend).scaleb(-9), "f")]
        )
    return out.getvalue()
