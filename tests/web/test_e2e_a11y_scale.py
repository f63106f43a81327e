"""Keyboard only, an axe-core scan, a 1,500-message thread, and the client's figures."""

from __future__ import annotations

import gzip
import re
from typing import Any

import psycopg
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.web.conftest import ROOT, Api, Stack, figure, open_thread, sign_in

AXE = ROOT / "web" / "node_modules" / "axe-core" / "axe.min.js"


def _focused_name(page: Page) -> str:
    return str(page.evaluate("document.activeElement?.textContent?.trim() ?? ''"))


def _tab_to(page: Page, name: str, *, limit: int = 30) -> None:
    for _ in range(limit):
        if _focused_name(page) == name:
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"Tab never reached {name!r}")


def test_a_keyboard_only_session(context: BrowserContext, stack: Stack) -> None:
    api = stack.api()
    page = sign_in(context, api)
    page.goto("/")
    expect(page.get_by_role("status", name="Connection")).to_have_text("Connected")
    _tab_to(page, "New project")
    page.keyboard.press("Enter")
    name = page.get_by_role("textbox", name="Project name")
    expect(name).to_be_focused()
    # The dialog keeps focus inside it, and Escape gives it back to where it was.
    for _ in range(5):
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.closest('dialog') !== null")
    page.keyboard.press("Escape")
    expect(page.get_by_role("button", name="New project")).to_be_focused()
    page.keyboard.press("Enter")
    page.keyboard.type("Keyboard project")
    page.keyboard.press("Enter")
    expect(page.get_by_role("navigation", name="Projects")).to_contain_text("Keyboard project")
    _tab_to(page, "New thread")
    page.keyboard.press("Enter")
    composer = page.get_by_role("textbox", name="Message")
    expect(composer).to_be_focused()
    stack.control(text="Typed without a mouse.")
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    page.keyboard.press("Enter")
    log = page.get_by_role("log", name="Messages")
    mine = log.get_by_role("article").filter(has_text="first line")
    expect(mine).to_contain_text("second line")
    expect(log.get_by_role("article").filter(has_text="Typed without a mouse.")).to_have_count(1)
    expect(composer).to_be_focused()
    # Back into the conversation: Shift+Tab reaches the message's actions.
    for _ in range(4):
        page.keyboard.press("Shift+Tab")
        if _focused_name(page) == "Edit":
            break
    assert _focused_name(page) == "Edit"
    page.keyboard.press("Enter")
    editor = page.get_by_role("textbox", name="Edit message")
    expect(editor).to_be_focused()
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.type("edited by keyboard")
    page.keyboard.press("Enter")
    edited = log.get_by_role("article").filter(has_text="edited by keyboard")
    expect(edited).to_have_count(1)
    expect(edited.get_by_role("button", name="Edit")).to_be_focused()
    _tab_to(page, "Sign out", limit=40)
    page.keyboard.press("Enter")
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()


def _axe(page: Page) -> list[dict[str, Any]]:
    page.add_script_tag(path=str(AXE))
    result: dict[str, Any] = page.evaluate(
        "async () => await axe.run(document, {resultTypes: ['violations']})"
    )
    return [v for v in result["violations"] if v["impact"] in ("serious", "critical")]


def test_axe_finds_no_serious_or_critical_violation(browser: Browser, stack: Stack) -> None:
    # axe is injected as a script: only this context bypasses the CSP to allow it.
    context = browser.new_context(base_url=stack.url, bypass_csp=True)
    try:
        page = context.new_page()
        page.goto("/")
        expect(page.get_by_role("button", name="Sign in")).to_be_visible()
        page.get_by_role("button", name="Sign in").click()  # empty form: a validation state
        found = {"signed out": _axe(page)}
        api = stack.api()
        project = api.project("Accessible")
        thread = api.thread(project["id"], "Checked")
        for i in range(3):
            api.send(thread["id"], f"note {i}")
        page = sign_in(context, api)
        stack.control(text="A reply to scan.", reset=True)
        open_thread(page, project, thread)
        page.get_by_role("textbox", name="Message").fill("hello")
        page.keyboard.press("Enter")
        expect(page.get_by_role("article").filter(has_text="A reply to scan.")).to_have_count(1)
        found["thread"] = _axe(page)
        page.get_by_role("button", name="New project").click()
        expect(page.get_by_role("textbox", name="Project name")).to_be_focused()
        found["dialog"] = _axe(page)
        problems = {
            where: [(v["id"], v["help"], [n["target"] for n in v["nodes"]]) for v in violations]
            for where, violations in found.items()
            if violations
        }
        assert not problems, problems
    finally:
        context.close()


def _seed_long_thread(pg_dsn: str, api: Api, project_id: str, count: int) -> dict[str, Any]:
    """A thread of ``count`` messages, written in one transaction straight into the database."""
    thread = api.thread(project_id, "Long")
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(
            "INSERT INTO thread_events (thread_id, seq, type, payload)"
            " SELECT %s, g, 'message.created', '{}'::jsonb"
            " FROM generate_series(1, %s) g ORDER BY g",
            (thread["id"], count),
        )
        conn.execute(
            "INSERT INTO messages (thread_id, seq, role, author_id, content)"
            " SELECT %s, g, CASE WHEN g %% 2 = 1 THEN 'user' ELSE 'assistant' END,"
            "        CASE WHEN g %% 2 = 1 THEN %s::uuid END,"
            "        'Message ' || g || repeat(' lorem ipsum', (g * 7) %% 23)"
            " FROM generate_series(1, %s) g",
            (thread["id"], api.user_id, count),
        )
    return thread


LAST_VISIBLE = """(text) => {
  const log = document.querySelector('[role="log"]');
  if (!log) return false;
  const box = log.getBoundingClientRect();
  return [...log.querySelectorAll('article')].some((a) => {
    const r = a.getBoundingClientRect();
    return a.textContent.includes(text) && r.bottom <= box.bottom + 1 && r.top >= box.top - 1;
  });
}"""


# Resolves once the log's scrollTop and height have stayed the same for three animation frames.
SETTLED = """() => new Promise((resolve) => {
  let last = null, same = 0;
  const tick = () => {
    const log = document.querySelector('[role="log"]');
    const now = `${log.scrollTop}/${log.querySelector('.log-inner').style.height}`;
    same = now === last ? same + 1 : 0;
    last = now;
    if (same >= 3) resolve(true); else requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
})"""

# The first message whose top is inside the log's box, and how far below the box's top it is.
FIRST_ON_SCREEN = """() => {
  const log = document.querySelector('[role="log"]');
  const box = log.getBoundingClientRect();
  for (const a of log.querySelectorAll('article')) {
    const top = a.getBoundingClientRect().top - box.top;
    if (top >= 0) return [a.dataset.seq, top];
  }
  return null;
}"""


def test_a_long_thread_stays_virtualised_and_keeps_its_place(
    context: BrowserContext, stack: Stack, pg_dsn: str
) -> None:
    api = stack.api()
    project = api.project("Archive")
    thread = _seed_long_thread(pg_dsn, api, project["id"], 1500)
    page = sign_in(context, api)
    page.goto(f"/p/{project['id']}")
    expect(page.get_by_role("status", name="Connection")).to_have_text("Connected")
    started = page.evaluate("performance.now()")
    page.get_by_role("navigation", name="Threads").get_by_role("button", name="Long").click()
    page.wait_for_function(LAST_VISIBLE, arg="Message 1500 ")
    shown = page.evaluate("performance.now()") - started
    figure(
        "time from opening a 1,500-message thread to its last message on screen", f"{shown:.0f} ms"
    )
    log = page.get_by_role("log", name="Messages")
    rendered = log.get_by_role("article").count()
    assert rendered < 60, f"{rendered} articles in the DOM: not virtualised"
    figure("articles in the DOM for that thread", str(rendered))

    # Scroll to the top: older pages load above and the reader stays where they were.
    for page_no in range(1, 4):
        anchor = 1500 - 100 * page_no + 1  # the oldest loaded row: at the top once scrolled up
        log.evaluate("el => { el.scrollTop = 0; el.dispatchEvent(new Event('scroll')); }")
        page.wait_for_function(
            "(seq) => Number(document.querySelector('[role=log] article').dataset.seq) < seq",
            arg=anchor,
        )
        # The anchor row is still in view, not pushed away by what loaded above it.
        page.wait_for_function(
            """(seq) => {
              const log = document.querySelector('[role="log"]');
              const a = log.querySelector(`article[data-seq="${seq}"]`);
              if (!a) return false;
              const r = a.getBoundingClientRect(), box = log.getBoundingClientRect();
              return r.top < box.bottom && r.bottom > box.top && log.scrollTop > 0;
            }""",
            arg=anchor,
        )
        assert log.get_by_role("article").count() < 60

    # Scrolled up, a new message does not move the view; at the bottom, it is followed. Rows
    # loaded above are measured after they render, and the virtualiser moves scrollTop to make up
    # for their real heights (the rows on screen stay put): the view is judged by what the reader
    # sees, the first row on screen and its offset, once the layout has settled.
    page.evaluate(SETTLED)
    seen = page.evaluate(FIRST_ON_SCREEN)
    height = log.evaluate("el => el.querySelector('.log-inner').style.height")
    api.send(thread["id"], "Message 1501 arrives")
    # Once it is in the store (a row more to scroll over), the view has not moved.
    page.wait_for_function(
        "(n) => document.querySelector('[role=log] .log-inner').style.height !== n", arg=height
    )
    page.evaluate(SETTLED)
    now = page.evaluate(FIRST_ON_SCREEN)
    assert now[0] == seen[0] and abs(now[1] - seen[1]) < 2, f"view moved: {seen} -> {now}"
    log.evaluate("el => { el.scrollTop = el.scrollHeight; el.dispatchEvent(new Event('scroll')); }")
    page.wait_for_function(LAST_VISIBLE, arg="Message 1501 arrives")
    api.send(thread["id"], "Message 1502 follows")
    page.wait_for_function(LAST_VISIBLE, arg="Message 1502 follows")


TYPING_PROBE = """() => {
  window.__events = []; window.__long = [];
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) window.__events.push(e.duration);
  }).observe({type: 'event', durationThreshold: 16, buffered: false});
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) window.__long.push(e.duration);
  }).observe({type: 'longtask', buffered: false});
  window.__frames = 0;
  const log = document.querySelector('[role="log"]');
  new MutationObserver(() => window.__frames++).observe(
    log, {characterData: true, subtree: true, childList: true});
}"""


def test_figures_first_load_and_typing_while_a_reply_streams(
    context: BrowserContext, stack: Stack
) -> None:
    index = (ROOT / "server" / "webdist" / "index.html").read_text()
    scripts = re.findall(r'<script[^>]*src="/([^"]+\.js)"', index)
    preloads = re.findall(r'<link rel="modulepreload"[^>]*href="/([^"]+\.js)"', index)
    raw = [(ROOT / "server" / "webdist" / p).read_bytes() for p in scripts + preloads]
    gz = sum(len(gzip.compress(b, 9)) for b in raw)
    figure(
        "first-load JavaScript", f"{sum(map(len, raw)) / 1024:.1f} KB, {gz / 1024:.1f} KB gzipped"
    )
    assert gz < 150 * 1024, "over the 150 KB gzipped budget"

    api = stack.api()
    project = api.project()
    thread = api.thread(project["id"], "Typing")
    page = sign_in(context, api)
    open_thread(page, project, thread)
    stack.control(tokens=300, delay_per_token_ms=20)  # 50 tokens a second for 6 s
    composer = page.get_by_role("textbox", name="Message")
    composer.fill("Stream for a while please")
    composer.press("Enter")
    busy = page.locator("article[aria-busy='true']")
    expect(busy).to_have_count(1)
    page.evaluate(TYPING_PROBE)
    typed = "typing stays responsive while the reply streams in " * 2
    page.keyboard.type(typed, delay=25)
    expect(composer).to_have_value(typed)
    still_streaming = busy.count() == 1
    events: list[float] = page.evaluate("window.__events")
    long_tasks: list[float] = page.evaluate("window.__long")
    frames = page.evaluate("window.__frames")
    figure(
        "typing while a reply streams at 50 tokens/s",
        f"{len(typed)} keys; {len(events)} input events over 16 ms (max "
        f"{max(events, default=0):.0f} ms); {len(long_tasks)} long tasks (max "
        f"{max(long_tasks, default=0):.0f} ms); {frames} DOM updates of the log; "
        f"reply still streaming when typing ended: {still_streaming}",
    )
    expect(busy).to_have_count(0, timeout=30_000)
