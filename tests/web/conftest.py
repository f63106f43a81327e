"""Browser tests: a real ``threadline serve`` and ``threadline fake-llm`` as processes, driven
through Debian's Chromium with Playwright (sync API; these tests are plain functions, not trio).

One server, one fake provider and one browser serve the whole module set; each test makes its
own account (so tests never see each other's data) in a fresh browser context.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

playwright_sync = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, BrowserContext, Page, expect  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).parent / "out"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Generous: the machine is shared; Playwright's expectations poll until this deadline.
expect.set_options(timeout=15_000)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(
    args: list[str], env: dict[str, str], banner: bytes
) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):
        if line.startswith(banner):
            return proc, line.decode().split(" on ", 1)[1].strip()
    raise AssertionError(f"{args[0]} exited during start-up with {proc.wait()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Stack:
    """The running server (``url``) and fake provider (``llm``: its base, without /v1)."""

    url: str
    llm: str
    env: dict[str, str] = field(default_factory=dict)  # how the server was started

    def start_server(self, port: int, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
        """Another ``threadline serve`` like this one (same database, secret and provider)."""
        env = {**self.env, "THREADLINE_DATA_DIR": str(data_dir)}
        return _start(["serve", "--port", str(port)], env, b"threadline: serving on")

    def control(self, **changes: Any) -> None:
        """Change the fake provider's behaviour (``POST /control``)."""
        response = httpx.post(self.llm + "/control", json=changes, timeout=5)
        response.raise_for_status()

    def api(self) -> Api:
        return Api(self.url)


class Api:
    """A REST client with its own account (bearer token), for setting the scene."""

    def __init__(self, base: str) -> None:
        self.http = httpx.Client(base_url=base + "/api/v1", timeout=15)
        self.email = f"u{uuid.uuid4().hex[:10]}@example.com"
        self.password = "correct horse battery"
        self.http.post("/auth/register", json={"email": self.email, "password": self.password})
        login = self.http.post(
            "/auth/login", json={"email": self.email, "password": self.password}
        ).json()
        self.user_id = login["user"]["id"]
        self.http.headers["Authorization"] = f"Bearer {login['access_token']}"
        self.http.cookies.clear()

    def post(self, path: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        response = self.http.post(path, json=body, **kw)
        assert response.status_code in (200, 201), response.text
        return response.json()  # type: ignore[no-any-return]

    def project(self, name: str = "Research") -> dict[str, Any]:
        return self.post("/projects", {"name": name})

    def thread(self, project_id: str, title: str = "") -> dict[str, Any]:
        return self.post(f"/projects/{project_id}/threads", {"title": title})

    def send(self, thread_id: str, content: str, *, reply: bool = False) -> dict[str, Any]:
        return self.post(f"/threads/{thread_id}/messages", {"content": content, "reply": reply})


@pytest.fixture(scope="session")
def stack(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not (ROOT / "server" / "webdist" / "index.html").is_file():
        pytest.fail("the web client is not built: `make setup` builds it into server/webdist")
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    llm_proc, llm_url = _start(["fake-llm", "--port", "0"], env, b"fake-llm: serving on")
    port = free_port()
    env.update(
        THREADLINE_DATABASE_URL=pg_dsn,
        THREADLINE_DATA_DIR=str(tmp_path_factory.mktemp("web-data")),
        THREADLINE_JWT_SECRET="web-e2e-" + uuid.uuid4().hex,
        THREADLINE_LOG_FORMAT="json",
        THREADLINE_LOG_LEVEL="warning",
        THREADLINE_LLM_BASE_URL=llm_url,
        THREADLINE_LLM_API_KEY="sk-e2e",
        THREADLINE_LLM_MODEL="fake-gpt",
        THREADLINE_LLM_PRICES=json.dumps(
            {"fake-gpt": {"prompt_per_1k": 0.5, "completion_per_1k": 1.5}}
        ),
        THREADLINE_ARGON2_TIME_COST="1",
        THREADLINE_ARGON2_MEMORY_KIB="8",
        THREADLINE_ARGON2_PARALLELISM="1",
        THREADLINE_RATE_LIMIT_PER_S="1000",
        THREADLINE_RATE_LIMIT_BURST="5000",
        THREADLINE_IP_RATE_LIMIT_PER_S="1000",
        THREADLINE_IP_RATE_LIMIT_BURST="5000",
        THREADLINE_GRACEFUL_TIMEOUT_S="3",
    )
    try:
        server_proc, url = _start(["serve", "--port", str(port)], env, b"threadline: serving on")
    except BaseException:
        stop(llm_proc)
        raise
    stack = Stack(url=url, llm=llm_url.removesuffix("/v1"), env=env)
    try:
        yield stack
    finally:
        stop(server_proc)
        stop(llm_proc)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        pytest.fail(
            "Debian's chromium is needed; `make test` installs it (apt-get install chromium)"
        )
    # trio-asyncio installs its own event-loop policy; Playwright's sync API needs a plain
    # asyncio loop of its own, made here under the default policy (the old one is put back).
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        manager = playwright_sync.sync_playwright()
        pw = manager.__enter__()
    finally:
        asyncio.set_event_loop_policy(policy)
    try:
        browser = pw.chromium.launch(
            executable_path=executable,
            args=CHROMIUM_FLAGS,  # Playwright gives each launch a fresh user-data-dir itself
        )
        try:
            yield browser
        finally:
            if _PLAYWRIGHT_LOOP:
                asyncio._set_running_loop(_PLAYWRIGHT_LOOP[0])
            browser.close()
    finally:
        manager.__exit__(None, None, None)
        asyncio._set_running_loop(None)


_PLAYWRIGHT_LOOP: list[asyncio.AbstractEventLoop] = []


@pytest.fixture(autouse=True)
def _lend_the_asyncio_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Playwright's sync API keeps its loop marked as this thread's running loop between calls
    (and needs it so). Between browser tests the mark is lifted, so trio-asyncio tests running
    meanwhile in this process find none, and put back for the next browser test."""
    if "browser" not in request.fixturenames:
        yield
        return
    if _PLAYWRIGHT_LOOP:
        asyncio._set_running_loop(_PLAYWRIGHT_LOOP[0])
    yield
    loop = asyncio._get_running_loop()
    if loop is not None:
        _PLAYWRIGHT_LOOP[:] = [loop]
        asyncio._set_running_loop(None)


@pytest.fixture
def context(browser: Browser, stack: Stack) -> Iterator[BrowserContext]:
    stack.control(reset=True)
    ctx = browser.new_context(base_url=stack.url, viewport={"width": 1280, "height": 800})
    try:
        yield ctx
    finally:
        ctx.close()


def sign_in(context: BrowserContext, api: Api) -> Page:
    """A tab signed in as ``api``'s account (cookies from a real login)."""
    response = context.request.post(
        "/api/v1/auth/login", data={"email": api.email, "password": api.password}
    )
    assert response.ok, response.text()
    page = context.new_page()
    return page


def open_thread(page: Page, project: dict[str, Any], thread: dict[str, Any]) -> None:
    """Load the client straight at a thread and wait until it is live."""
    page.goto(f"/p/{project['id']}/t/{thread['id']}")
    expect(page.get_by_role("status", name="Connection")).to_have_text("Connected")
    expect(page.get_by_role("textbox", name="Message")).to_be_focused()


FIGURES: list[str] = []


def figure(name: str, value: str) -> None:
    """Record a measured figure (reported at the end of the run, never asserted as a timing)."""
    FIGURES.append(f"{name}: {value}")
    OUT.mkdir(exist_ok=True)
    (OUT / "figures.txt").write_text("\n".join(FIGURES) + "\n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("web client figures (measured in this run, not asserted)")
        for line in FIGURES:
            terminalreporter.write_line(line)
