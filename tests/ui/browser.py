"""A real browser for the dashboard tests: Debian's chromium driven by Playwright, a running
gateway (uvicorn, SQLite ledger, scheduler on) in front of the mock upstream, screenshots."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "artifacts" / "ui-screenshots"
WIDTHS = {"laptop": (1366, 768), "phone": (390, 844)}


def chromium_path() -> str:
    """The system browser (Playwright's own downloads are not available). Missing is a
    failure, not a skip: CI installs it (.ci/run)."""
    path = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if path is None:
        pytest.fail(
            "the dashboard's browser tests need Debian's chromium package: "
            "apt-get install -y --no-install-recommends chromium (.ci/run installs it)",
            pytrace=False,
        )
    return path


def dollars(text: str) -> Decimal:
    """A money figure as the dashboard writes it ("$1,234.56", "-$0.10") as a number."""
    cleaned = text.strip().replace(",", "").replace("$", "")
    return Decimal(cleaned)


def to_the_cent(shown: str, api_value: float | int | str) -> bool:
    return abs(dollars(shown) - Decimal(str(api_value))) <= Decimal("0.005")


@dataclass
class NetworkLog:
    """Every request a page made, and those its Content-Security-Policy stopped before they
    left (the browser reports them too: ReDoc's "powered by" logo from its CDN, on /redoc)."""

    origin: str
    urls: list[str] = field(default_factory=list)
    blocked: list[tuple[str, str]] = field(default_factory=list)  # (page, request) URLs
    console_errors: list[str] = field(default_factory=list)

    def foreign(self) -> list[str]:
        """Requests to another origin that the browser sent."""
        stopped = {request for _, request in self.blocked}
        return [
            u
            for u in self.urls
            if not (u.startswith(self.origin + "/") or u.startswith(("data:", "blob:")))
            and u not in stopped
        ]


def watch(page: Any, log: NetworkLog) -> None:
    page.on("request", lambda req: log.urls.append(req.url))
    page.on(
        "requestfailed",
        lambda req: log.blocked.append((page.url, req.url)) if req.failure == "csp" else None,
    )
    page.on(
        "console",
        lambda msg: (
            log.console_errors.append(f"{page.url}: {msg.text}") if msg.type == "error" else None
        ),
    )
    page.on("pageerror", lambda exc: log.console_errors.append(f"{page.url}: {exc}"))


UNNAMED = """
[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
  .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
  .map(e => e.outerHTML.slice(0, 80))
.concat([...document.querySelectorAll('svg[role=img], canvas[role=img]')]
  .filter(e => !e.getAttribute('aria-label')).map(e => e.outerHTML.slice(0, 80)))
.concat([...document.querySelectorAll('a, button')]
  .filter(e => !e.textContent.trim() && !e.getAttribute('aria-label'))
  .map(e => e.outerHTML.slice(0, 80)))
"""


def unnamed(page: Any) -> list[str]:
    """Form controls without a label, images without a text, links and buttons without a
    name: what a screen reader could not announce."""
    return list(page.evaluate(UNNAMED))


def settle_frames(page: Any) -> None:
    """Two animation frames: a chart resized with the viewport has been redrawn."""
    page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def shoot(
    page: Any, name: str, *, check_overflow: bool = True, javascript: bool = True
) -> list[Path]:
    """Full-page screenshots at laptop and phone width; on the dashboard's own pages, also
    that nothing is wider than the window and (with JavaScript) that every chart was drawn."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, (width, height) in WIDTHS.items():
        page.set_viewport_size({"width": width, "height": height})
        if javascript:
            settle_frames(page)
            for canvas in page.locator("canvas").all():
                assert canvas.get_attribute("data-drawn") == "true", f"{name}: chart not drawn"
        if check_overflow:  # the dashboard's own pages (not Swagger UI's or ReDoc's)
            assert unnamed(page) == [], f"{name}: controls or images without an accessible name"
            overflow = page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"{name} at {label} width overflows by {overflow}px"
        path = SHOTS / f"{name}-{label}.png"
        page.screenshot(path=str(path), full_page=True)
        paths.append(path)
    page.set_viewport_size({"width": WIDTHS["laptop"][0], "height": WIDTHS["laptop"][1]})
    return paths


class Admin:
    """The admin API of the gateway under test, to compare the pages with."""

    def __init__(self, url: str, admin_key: str) -> None:
        self.client = httpx.Client(
            base_url=url, headers={"authorization": f"Bearer {admin_key}"}, timeout=30
        )

    def get(self, path: str, **params: Any) -> Any:
        r = self.client.get(path, params={k: v for k, v in params.items() if v is not None})
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        r = self.client.post(path, json=body)
        assert r.status_code in (200, 201), r.text
        return r.json()

    def close(self) -> None:
        self.client.close()


def launch(playwright: Any) -> Iterator[Any]:
    browser = playwright.chromium.launch(executable_path=chromium_path())
    try:
        yield browser
    finally:
        browser.close()
