"""The dashboard's colours: every text colour on the backgrounds it is used on has a contrast
of at least 4.5:1 (WCAG AA for body text), read from the stylesheet's own variables."""

from __future__ import annotations

import re
from pathlib import Path

CSS = Path(__file__).resolve().parents[2] / "app" / "ui" / "static" / "ui.css"

# (text, background) pairs as the stylesheet uses them
PAIRS = [
    ("--fg", "--bg"),
    ("--fg", "--card"),
    ("--muted", "--bg"),
    ("--muted", "--card"),
    ("--accent", "--card"),  # links, buttons' text
    ("--accent-dark", "--card"),
    ("--warn", "--card"),
    ("--bad", "--card"),
    ("--ok", "--card"),
    ("#ffffff", "--accent-dark"),  # the header
    ("#ffffff", "--accent"),  # primary buttons
    ("#ffffff", "--bad"),  # the revoke button
    ("--bad", "#fef2f2"),  # an error's box
    ("--ok", "#f0fdf4"),  # a notice's box
]


def palette() -> dict[str, str]:
    root = re.search(r":root\s*{([^}]*)}", CSS.read_text())
    assert root, "no :root block in ui.css"
    return dict(re.findall(r"(--[\w-]+):\s*(#[0-9a-fA-F]{6})", root.group(1)))


def luminance(hex_colour: str) -> float:
    channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_text_colours_have_a_contrast_of_at_least_4_5() -> None:
    colours = palette()
    assert len(colours) >= 10
    for text, background in PAIRS:
        fg, bg = colours.get(text, text), colours.get(background, background)
        assert contrast(fg, bg) >= 4.5, (text, background, round(contrast(fg, bg), 2))


def test_the_check_can_fail() -> None:
    assert contrast("#777777", "#ffffff") < 4.5  # a light grey on white
    assert round(contrast("#000000", "#ffffff"), 1) == 21.0
