"""The whole flow in a real Chromium: account, project, thread, send, streamed reply, spend."""

from __future__ import annotations

import re

from playwright.sync_api import BrowserContext, expect

from tests.web.conftest import OUT, Stack


def test_account_to_reply(context: BrowserContext, stack: Stack) -> None:
    page = context.new_page()
    page.goto("/")
    email = f"new{re.sub(r'[^0-9]', '', str(id(page)))}@example.com"
    page.get_by_role("textbox", name="Email").fill(email)
    page.get_by_label("Password").fill("short")
    page.get_by_role("button", name="Create account").click()
    # The server refuses a short password; the reason is announced, nothing crashes.
    expect(page.get_by_role("alert")).to_contain_text("password")
    page.get_by_label("Password").fill("correct horse battery")
    page.get_by_role("button", name="Create account").click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    expect(page.get_by_role("status", name="Connection")).to_have_text("Connected")

    page.get_by_role("button", name="New project").click()
    page.get_by_role("textbox", name="Project name").fill("Research")
    page.get_by_role("button", name="Create").click()
    projects = page.get_by_role("navigation", name="Projects")
    expect(projects.get_by_role("button", name="Research")).to_be_visible()
    threads = page.get_by_role("navigation", name="Threads")
    expect(threads).to_contain_text("This month")
    expect(threads).to_contain_text("$0.00")
    threads.get_by_role("button", name="New thread").click()
    expect(threads.get_by_role("button", name="Untitled")).to_be_visible()
    composer = page.get_by_role("textbox", name="Message")
    expect(composer).to_be_focused()

    stack.control(text="Hello from the fake model. It streams word by word.")
    composer.fill("Hi there")
    composer.press("Enter")
    expect(composer).to_have_value("")
    expect(composer).to_be_focused()
    log = page.get_by_role("log", name="Messages")
    mine = log.get_by_role("article").filter(has_text="Hi there")
    expect(mine).to_have_count(1)
    expect(mine).to_contain_text("You")
    reply = log.get_by_role("article").filter(has_text="Assistant")
    expect(reply).to_contain_text("It streams word by word.")
    expect(reply).not_to_have_attribute("aria-busy", "true")
    expect(mine).to_have_count(1)
    # The reply cost money: the spend shown follows it.
    expect(threads).not_to_contain_text("$0.00")
    expect(threads).to_contain_text(re.compile(r"This month: \$0\.\d*[1-9]"))

    # The README shows a copy of this (docs/web-client.png).
    OUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUT / "web-client.png"))

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    # Signed out for real: a reload does not bring the session back.
    page.reload()
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
