"""Live behaviour in a real Chromium: streaming with aria-busy and the polite live region, Stop,
two tabs, going offline and back, an edit conflict."""

from __future__ import annotations

import re
import time

from playwright.sync_api import BrowserContext, Page, expect

from tests.web.conftest import Stack, open_thread, sign_in

SENTENCES = (
    "The first sentence is short. A second one follows it closely. "
    "Here comes a third sentence with a few more words in it. "
    "The fourth is the last one of the reply."
)

COUNT_LIVE_REGION = """() => {
  const region = document.querySelector('[role="status"][aria-label="Reply announcements"]');
  window.__said = [];
  new MutationObserver(() => window.__said.push(region.textContent)).observe(
    region, {childList: true, characterData: true, subtree: true});
}"""


def _articles(page: Page) -> list[str]:
    return page.get_by_role("log", name="Messages").get_by_role("article").all_inner_texts()


def test_streaming_reply_is_busy_announced_by_sentence_and_can_be_stopped(
    context: BrowserContext, stack: Stack
) -> None:
    api = stack.api()
    project = api.project()
    thread = api.thread(project["id"], "Streaming")
    page = sign_in(context, api)
    open_thread(page, project, thread)
    page.evaluate(COUNT_LIVE_REGION)
    stack.control(text=SENTENCES, delay_per_token_ms=80)  # 30 words: about 2.4 s
    composer = page.get_by_role("textbox", name="Message")
    composer.fill("Tell me four things")
    composer.press("Enter")
    log = page.get_by_role("log", name="Messages")
    reply = log.locator("article[aria-busy='true']")
    expect(reply).to_have_count(1)
    expect(reply).to_contain_text("Assistant")
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    started = time.monotonic()
    done = log.get_by_role("article").filter(has_text="The fourth is the last one of the reply.")
    expect(done).to_have_count(1)
    expect(done).not_to_have_attribute("aria-busy", "true")
    region = page.get_by_role("status", name="Reply announcements")
    expect(region).to_contain_text("The fourth is the last one of the reply.")
    elapsed = time.monotonic() - started
    said: list[str] = page.evaluate("window.__said")
    said = [s for s in said if s.strip()]
    assert said, "the live region announced nothing"
    # Whole sentences only, never token by token: each announcement ends a sentence, and there
    # are at most one per 2 s of streaming plus the one at completion (30 tokens streamed).
    for text in said:
        assert re.search(r"[.!?]$", text.strip()), said
    assert len(said) <= 2 + (elapsed + 3) / 2, said
    assert " ".join(s.strip() for s in said).endswith("The fourth is the last one of the reply.")
    expect(page.get_by_role("button", name="Stop")).to_have_count(0)

    # Stop: the partial text stays, the reply is marked stopped.
    stack.control(text=" ".join(f"word{i}" for i in range(400)), delay_per_token_ms=40)
    composer.fill("Now talk for a long time")
    composer.press("Enter")
    busy = log.locator("article[aria-busy='true']")
    expect(busy).to_contain_text("word3")
    page.get_by_role("button", name="Stop").click()
    stopped = log.get_by_role("article").filter(has_text="Stopped")
    expect(stopped).to_have_count(1)
    expect(stopped).to_contain_text("word3")
    expect(stopped).not_to_contain_text("word399")
    expect(busy).to_have_count(0)


def test_two_tabs_see_each_others_messages_once(context: BrowserContext, stack: Stack) -> None:
    api = stack.api()
    project = api.project()
    thread = api.thread(project["id"], "Shared")
    first = sign_in(context, api)
    open_thread(first, project, thread)
    second = context.new_page()
    open_thread(second, project, thread)
    stack.control(text="Noted.")
    for page, other, text in (
        (first, second, "from the first tab"),
        (second, first, "from tab two"),
    ):
        composer = page.get_by_role("textbox", name="Message")
        composer.fill(text)
        composer.press("Enter")
        for tab in (page, other):
            mine = tab.get_by_role("log", name="Messages").get_by_role("article")
            expect(mine.filter(has_text=text)).to_have_count(1)
    for tab in (first, second):
        expect(tab.get_by_role("article").filter(has_text="Noted.")).to_have_count(2)
        texts = _articles(tab)
        assert len(texts) == 4, texts


def test_offline_and_back_loses_nothing_and_doubles_nothing(
    context: BrowserContext, stack: Stack
) -> None:
    api = stack.api()
    project = api.project()
    thread = api.thread(project["id"], "Flaky network")
    for i in range(3):
        api.send(thread["id"], f"before {i}")
    page = sign_in(context, api)
    open_thread(page, project, thread)
    log = page.get_by_role("log", name="Messages")
    expect(log.get_by_role("article")).to_have_count(3)

    context.set_offline(True)
    expect(page.get_by_role("status", name="Connection")).to_have_text("Offline")
    for i in range(3):  # written elsewhere while this tab is away
        api.send(thread["id"], f"while away {i}")
    composer = page.get_by_role("textbox", name="Message")
    composer.fill("typed offline")
    composer.press("Enter")
    unsent = log.get_by_role("article").filter(has_text="typed offline")
    expect(unsent).to_contain_text("Not sent")
    expect(unsent.get_by_role("button", name="Retry")).to_be_visible()

    context.set_offline(False)
    expect(page.get_by_role("status", name="Connection")).to_have_text("Connected")
    for i in range(3):
        expect(log.get_by_role("article").filter(has_text=f"while away {i}")).to_have_count(1)
    stack.control(text="Welcome back.")
    unsent.get_by_role("button", name="Retry").click()
    sent = log.get_by_role("article").filter(has_text="typed offline")
    expect(sent).to_have_count(1)
    expect(sent).not_to_contain_text("Not sent")
    expect(log.get_by_role("article").filter(has_text="Welcome back.")).to_have_count(1)
    texts = _articles(page)
    assert len(texts) == len(set(texts)) == 8, texts
    # The server holds the retried message once (the same client_msg_id both times).
    items = api.http.get(f"/threads/{thread['id']}/messages").json()["items"]
    assert [m["content"] for m in items].count("typed offline") == 1


def test_an_edit_conflict_is_shown_and_the_latest_text_wins(
    context: BrowserContext, stack: Stack
) -> None:
    api = stack.api()
    project = api.project()
    thread = api.thread(project["id"], "Edits")
    message = api.send(thread["id"], "original text")
    page = sign_in(context, api)
    open_thread(page, project, thread)
    article = page.get_by_role("article").filter(has_text="original text")
    article.get_by_role("button", name="Edit").click()
    editor = page.get_by_role("textbox", name="Edit message")
    expect(editor).to_be_focused()
    # Someone else edits it first.
    changed = api.http.patch(
        f"/messages/{message['id']}",
        json={"content": "their newer text"},
        headers={"If-Match": "1"},
    )
    assert changed.status_code == 200, changed.text
    editor.fill("my late edit")
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_role("alert")).to_contain_text("changed")
    log = page.get_by_role("log", name="Messages")
    expect(log.get_by_role("article").filter(has_text="their newer text")).to_have_count(1)
    expect(log.get_by_role("article").filter(has_text="my late edit")).to_have_count(0)
    # Editing again from the latest version succeeds.
    log.get_by_role("article").get_by_role("button", name="Edit").click()
    page.get_by_role("textbox", name="Edit message").fill("agreed text")
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_role("textbox", name="Edit message")).to_have_count(0)
    expect(log.get_by_role("article").filter(has_text="agreed text")).to_contain_text("edited")
    expect(log.get_by_role("button", name="Edit")).to_be_focused()  # focus returns
    assert api.http.get(f"/messages/{message['id']}").json()["version"] == 3
