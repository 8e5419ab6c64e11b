"""GET / and /ui/: the built-in web page (status and playground), from package files."""

from __future__ import annotations

from importlib.resources import files

import falcon

from frontend.context import AppContext
from frontend.openapi import Operation

# The page, its script and its stylesheet only: no inline code, no other origin.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# File name -> content type; anything else under /ui/ is a 404.
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def _serve(ctx: AppContext, resp: falcon.Response, name: str) -> None:
    if not ctx.settings.ui or name not in ASSETS:
        raise falcon.HTTPNotFound()
    resp.content_type = ASSETS[name]
    resp.data = files("frontend").joinpath("static", name).read_bytes()
    resp.set_header("Content-Security-Policy", CSP)
    resp.set_header("X-Content-Type-Options", "nosniff")
    resp.cache_control = ["no-cache"]


class PageResource:
    """The page at the server's root; its files are relative to it (works under a path prefix)."""

    openapi = {"get": Operation("The built-in web page: live status and a chat playground", media_type="text/html")}

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _serve(self._ctx, resp, "index.html")


class UiRedirectResource:
    """/ui/ is the same page: sent to the root, relatively, so a proxy prefix survives."""

    openapi = {"get": Operation("Redirects (302) to the web page at the root", media_type="text/html")}

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self._ctx.settings.ui:
            raise falcon.HTTPNotFound()
        # Relative to the URL the browser holds, so a proxy prefix (/m/NAME/) survives:
        # from .../ui/ the page is "../", from .../ui it is "./" (falcon strips the slash
        # from req.path, not from PATH_INFO).
        raise falcon.HTTPFound("../" if req.env.get("PATH_INFO", "").endswith("/") else "./")


class AssetResource:
    """The page's script and stylesheet."""

    openapi = {
        "get": Operation(
            "A file of the web page (app.js, app.css, favicon.svg)", media_type="text/plain", errors=(404,)
        )
    }

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        _serve(self._ctx, resp, name)
