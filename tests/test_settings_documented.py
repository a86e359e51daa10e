"""The README's settings table and the Settings class agree: every setting is documented, and
every documented variable is a setting."""

from __future__ import annotations

import re
from pathlib import Path

from app.config import Settings

README = Path(__file__).parents[1] / "README.md"


def documented() -> set[str]:
    names = set()
    for line in README.read_text().splitlines():
        if line.startswith("| `BUDGETGATE_"):
            cell = line.split("|")[1]
            names |= {n.lower() for n in re.findall(r"`BUDGETGATE_(\w+)`", cell)}
    return names


def test_every_setting_is_in_the_readme_table_and_nothing_else() -> None:
    fields = set(Settings.model_fields)
    table = documented()
    assert fields - table == set(), "settings missing from README's table"
    assert table - fields == set(), "README documents variables that are not settings"
