"""The web client served by ``threadline serve`` (server/webui.py): caching, fallback, headers.

A small stand-in build in a temporary directory (THREADLINE_WEB_DIR) keeps these tests
independent of Vite; the browser tests (test_e2e_*.py) use the real build.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from server.runtime import open_server
from tests.conftest import make_settings

INDEX = (
    '<!doctype html><html><head><script type="module" src="/assets/index-abc123.js"></script>'
    '</head><body><div id="root"></div></body></html>'
)


def _build(root: Path) -> Path:
    dist = root / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text(INDEX)
    (dist / "assets" / "index-abc123.js").write_text("console.log('hi');")
    (dist / "favicon.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / "secret.txt").write_text("outside the build")
    return dist


async def _client(tmp_path: Path, pg_dsn: str, web_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(tmp_path, web_dir=web_dir)
    async with open_server(settings, pg_dsn, bind="127.0.0.1:0") as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=10.0) as http:
            yield http


@pytest.fixture
async def web(tmp_path: Path, pg_dsn: str) -> AsyncIterator[httpx.AsyncClient]:
    async for http in _client(tmp_path, pg_dsn, _build(tmp_path)):
        yield http


async def test_index_is_served_at_root_uncached_with_a_strict_csp(web: httpx.AsyncClient) -> None:
    response = await web.get("/")
    assert response.status_code == 200
    assert response.text == INDEX
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-cache"
    csp = {
        part.split()[0]: part.split()[1:]
        for part in response.headers["content-security-policy"].split("; ")
    }
    assert csp["script-src"] == ["'self'"], "no inline script, no eval"
    assert csp["frame-ancestors"] == ["'none'"]
    host = web.base_url.host + ":" + str(web.base_url.port)
    assert csp["connect-src"] == ["'self'", f"ws://{host}"]
    assert csp["object-src"] == ["'none'"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "strict-origin-when-cross-origin"


async def test_hashed_assets_are_cached_for_a_year(web: httpx.AsyncClient) -> None:
    response = await web.get("/assets/index-abc123.js")
    assert response.status_code == 200
    assert "javascript" in response.headers["content-type"]
    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert response.headers["x-content-type-options"] == "nosniff"
    other = await web.get("/favicon.svg")
    assert other.status_code == 200 and "immutable" not in other.headers["cache-control"]


async def test_client_routes_fall_back_to_the_index(web: httpx.AsyncClient) -> None:
    for path in ("/p/123", "/p/123/t/456", "/signin"):
        response = await web.get(path)
        assert response.status_code == 200, path
        assert response.text == INDEX
        assert response.headers["cache-control"] == "no-cache"


async def test_server_paths_keep_their_behaviour(web: httpx.AsyncClient) -> None:
    for path in ("/api/v1/nope", "/api/unknown", "/ws/extra", "/healthz/x", "/metrics/x"):
        response = await web.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found", path
    assert (await web.get("/healthz")).json() == {"status": "ok"}
    assert (await web.get("/api/v1/openapi.json")).json()["openapi"].startswith("3.1")
    assert (await web.get("/api/v1/projects")).status_code == 401
    assert "threadline_ws_connections" in (await web.get("/metrics")).text
    # API answers carry the generic hardening headers too.
    assert (await web.get("/healthz")).headers["x-content-type-options"] == "nosniff"


async def test_missing_files_and_paths_outside_the_build_are_not_found(
    web: httpx.AsyncClient,
) -> None:
    assert (await web.get("/assets/index-missing.js")).status_code == 404
    for path in ("/..%2fsecret.txt", "/assets/..%2f..%2fsecret.txt", "/.hidden"):
        response = await web.get(path)
        assert "outside the build" not in response.text, path
        assert response.text == INDEX or response.status_code == 404, path


async def test_without_a_build_root_says_how_to_build_it(tmp_path: Path, pg_dsn: str) -> None:
    async for http in _client(tmp_path, pg_dsn, tmp_path / "not-built"):
        response = await http.get("/")
        assert response.status_code == 503
        assert "make setup" in response.text and "not built" in response.text
        assert (await http.get("/p/1")).status_code == 503
        assert (await http.get("/healthz")).status_code == 200


def test_the_real_build_has_no_inline_script() -> None:
    from server import webui

    index = webui.DIST_DIR / "index.html"
    if not index.is_file():
        pytest.fail("server/webdist is missing: `make setup` builds the web client")
    html = index.read_text()
    assert "<script" in html
    for tag in html.split("<script")[1:]:
        assert "src=" in tag.split(">")[0], "inline script would be refused by the CSP"
