"""Putting the dashboard into the gateway's FastAPI app: its routes, its static files, the
offline API docs, and its errors as pages."""

from __future__ import annotations

import inspect
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from app.errors import AppError
from app.ui.access import PageError, SignInRequired
from app.ui.docs import add_docs_routes
from app.ui.pages import HERE, redirect
from app.ui.router import page_error, router
from app.ui.session import SessionSigner

PREFIX = "/ui"


def is_ui_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def install_ui(app: FastAPI) -> None:
    app.state.ui_signer = SessionSigner(app.state.settings)
    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    add_docs_routes(app)

    @app.get(PREFIX, include_in_schema=False)
    async def ui_root() -> Response:
        return redirect(f"{PREFIX}/")

    @app.exception_handler(SignInRequired)
    async def _sign_in(_request: Request, exc: SignInRequired) -> Response:
        return redirect(f"{PREFIX}/login?" + urlencode({"next": exc.next_url}))

    @app.exception_handler(PageError)
    async def _page_error(request: Request, exc: PageError) -> Response:
        return page_error(request, exc.status, exc.message)

    api_error = app.exception_handlers[AppError]

    async def _app_error(request: Request, exc: Exception) -> Response:
        """A service's error on a dashboard page (an unknown key id...) is a page; elsewhere
        the API's JSON error, as before."""
        if is_ui_path(request.url.path) and isinstance(exc, AppError):
            return page_error(request, exc.status, exc.message)
        answer = api_error(request, exc)
        return await answer if inspect.isawaitable(answer) else answer

    app.add_exception_handler(AppError, _app_error)
