"""Serves the built web client (``web/``, built by Vite into ``server/webdist``) at ``/``.

* ``/assets/*``: content-hashed files, ``Cache-Control: public, max-age=31536000, immutable``.
* ``index.html`` (``/`` and every client route, i.e. any other GET path without a file
  extension): ``Cache-Control: no-cache``, so a new release is picked up at the next load.
* The server's own paths keep their behaviour: ``/api/...``, ``/ws``, ``/healthz``, ``/readyz``
  and ``/metrics`` never fall back to the client; unknown ones stay JSON 404s.
* Every response of the client carries a strict Content-Security-Policy (no inline script,
  ``connect-src`` limited to this origin and its WebSocket origin, ``frame-ancestors 'none'``);
  every response of the server carries ``X-Content-Type-Options: nosniff`` and a
  ``Referrer-Policy``.
* Without a build (a checkout where ``make setup`` has not run) ``/`` answers 503 with a page
  that says how to build it, instead of failing.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path, PurePosixPath

from quart import Blueprint, Quart, Response, request
from werkzeug.exceptions import NotFound

DIST_DIR = Path(__file__).parent / "webdist"
# Paths owned by the server: never answered with the client's index.html.
_SERVER_PREFIXES = ("api", "ws", "healthz", "readyz", "metrics")
_IMMUTABLE = "public, max-age=31536000, immutable"
_REFERRER_POLICY = "strict-origin-when-cross-origin"
_NOT_BUILT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Threadline: web client not built</title></head>
<body><h1>The web client is not built</h1>
<p>This server is running, and its API is at <code>/api/v1</code>, but the web client has not
been built into <code>server/webdist</code>. Run <code>make setup</code> (or
<code>cd web &amp;&amp; npm ci &amp;&amp; npm run build</code>) and reload this page.</p>
</body></html>
"""


def content_security_policy(ws_origin: str) -> str:
    """The client's CSP: its own scripts and styles only; API and WebSocket on this origin."""
    return "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            "font-src 'self'",
            f"connect-src 'self' {ws_origin}",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        )
    )


def _ws_origin() -> str:
    scheme = "wss" if request.scheme in ("https", "wss") else "ws"
    return f"{scheme}://{request.host}"


def _secure(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = content_security_policy(_ws_origin())
    response.headers["X-Frame-Options"] = "DENY"
    return response


def _file_response(path: Path, cache_control: str) -> Response:
    mimetype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if mimetype.startswith("text/") or mimetype in ("application/javascript", "image/svg+xml"):
        mimetype += "; charset=utf-8"
    response = Response(path.read_bytes(), mimetype=mimetype)
    response.headers["Cache-Control"] = cache_control
    return _secure(response)


def _index(dist: Path) -> Response:
    index = dist / "index.html"
    if not index.is_file():
        response = Response(_NOT_BUILT, status=503, mimetype="text/html")
        response.headers["Cache-Control"] = "no-store"
        return _secure(response)
    return _file_response(index, "no-cache")


def _resolve(dist: Path, path: str) -> Path | None:
    """The file under ``dist`` that ``path`` names, or None (never anything outside ``dist``)."""
    parts = PurePosixPath(path).parts
    if any(part in ("..", ".") or part.startswith(".") for part in parts):
        return None
    candidate = dist.joinpath(*parts)
    return candidate if candidate.is_file() else None


def register(app: Quart, dist: Path | None = None) -> None:
    """Add the client's routes and the security headers to ``app``."""
    root = dist or DIST_DIR
    blueprint = Blueprint("webui", __name__)

    @blueprint.get("/")
    async def index() -> Response:
        """The client's entry page."""
        return _index(root)

    @blueprint.get("/<path:path>")
    async def client_path(path: str) -> Response:
        """A built file, or index.html for a client route; the server's own paths are left be."""
        first = path.split("/", 1)[0]
        if first in _SERVER_PREFIXES:
            raise NotFound()
        found = _resolve(root, path)
        if found is not None:
            hashed = path.startswith("assets/")
            return _file_response(found, _IMMUTABLE if hashed else "public, max-age=3600")
        if "." in PurePosixPath(path).name:  # a missing file, not a client route
            raise NotFound()
        return _index(root)

    @app.after_request
    async def _headers(response: Response) -> Response:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", _REFERRER_POLICY)
        return response

    app.register_blueprint(blueprint)
