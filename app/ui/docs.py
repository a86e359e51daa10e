"""Swagger UI and ReDoc, from the assets vendored in app/ui/static/vendor (nothing from a CDN:
the docs work offline and the pages load nothing from another origin)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse

VENDOR = "/ui/static/vendor"

# This origin only. Both bundles style themselves with inline styles; Swagger UI is started by
# an inline script; ReDoc parses in a blob: worker and shows a "powered by" logo from its CDN,
# which this policy blocks (ReDoc then leaves it out).
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def _offline(page: HTMLResponse) -> HTMLResponse:
    page.headers["content-security-policy"] = DOCS_CSP
    return page


FAVICON = f"{VENDOR}/swagger-ui/favicon-32x32.png"


def add_docs_routes(app: FastAPI) -> None:
    """/docs and /redoc as FastAPI serves them, with the vendored assets (the app is created
    with docs_url=None and redoc_url=None)."""
    title = app.title

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        assets = f"{VENDOR}/swagger-ui"
        page = get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{title} - Swagger UI",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=FAVICON,
            # No "valid" badge: it asks validator.swagger.io about the schema.
            swagger_ui_parameters={"validatorUrl": None},
        )
        return _offline(page)

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        script = f"{VENDOR}/redoc/redoc.standalone.js"
        return _offline(
            get_redoc_html(
                openapi_url="/openapi.json",
                title=f"{title} - ReDoc",
                redoc_js_url=script,
                redoc_favicon_url=FAVICON,
                with_google_fonts=False,
            )
        )
