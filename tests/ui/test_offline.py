"""Nothing the dashboard or the API docs serve points at another origin: every script, style,
image, link and form target is the gateway's own (the browser test watches the network too)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ADMIN_KEY, Gateway
from tests.ui.helpers import sign_in

STATIC = Path(__file__).resolve().parents[2] / "app" / "ui" / "static"
TEMPLATES = STATIC.parent / "templates"
# src=, href=, action= and CSS url(...) / @import targets
REFERENCE = re.compile(
    r"""(?:\b(?:src|href|action)\s*=\s*["']?|url\(\s*["']?|@import\s+["'])([^"'\s)>]+)""", re.I
)
# XML namespaces are names, not requests.
NAMESPACE = re.compile(r"xmlns(?::\w+)?=\"http://www\.w3\.org/[^\"]*\"")


def foreign(text: str) -> list[str]:
    text = NAMESPACE.sub("", text)
    return [
        ref
        for ref in REFERENCE.findall(text)
        if re.match(r"(?:https?:)?//", ref) and not ref.startswith("http://gateway/")
    ]


async def test_pages_and_docs_reference_only_their_own_origin(gateway: Gateway) -> None:
    login = await gateway.client.get("/ui/login")
    assert login.status_code == 200 and foreign(login.text) == []
    await sign_in(gateway.client, ADMIN_KEY)
    key = await gateway.create_key(alias="offline", max_budget=1)
    paths = [
        "/ui/",
        f"/ui/owners/key/{key['id']}",
        "/ui/keys",
        "/ui/keys/new",
        f"/ui/keys/{key['id']}/edit",
        f"/ui/keys/{key['id']}/reset",
        "/ui/usage",
        "/ui/ledger",
        "/docs",
        "/redoc",
    ]
    for path in paths:
        r = await gateway.client.get(path)
        assert r.status_code == 200, path
        assert REFERENCE.findall(r.text), f"{path}: the check found nothing to check"
        assert foreign(r.text) == [], path
    docs = (await gateway.client.get("/docs")).text
    redoc = (await gateway.client.get("/redoc")).text
    assert "/ui/static/vendor/swagger-ui/swagger-ui-bundle.js" in docs
    assert "/ui/static/vendor/redoc/redoc.standalone.js" in redoc
    assert "fonts.googleapis" not in redoc and "cdn." not in docs + redoc
    for asset in (
        "/ui/static/vendor/swagger-ui/swagger-ui-bundle.js",
        "/ui/static/vendor/swagger-ui/swagger-ui.css",
        "/ui/static/vendor/redoc/redoc.standalone.js",
        "/ui/static/vendor/chartjs/chart.umd.min.js",
        "/ui/static/ui.css",
        "/ui/static/ui.js",
    ):
        assert (await gateway.client.get(asset)).status_code == 200, asset


def test_templates_and_own_static_files_name_no_other_host() -> None:
    files = [*TEMPLATES.glob("*.html"), *STATIC.glob("*.css"), *STATIC.glob("*.js")]
    files += [*STATIC.glob("*.svg"), STATIC / "vendor" / "swagger-ui" / "swagger-ui.css"]
    assert len(files) > 10
    for path in files:
        text = NAMESPACE.sub("", path.read_text())
        assert foreign(text) == [], path
        if path.suffix != ".css":  # (swagger-ui.css: only its url() references matter)
            assert not re.findall(r"https?://", text), path
