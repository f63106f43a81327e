"""A server restart under an open tab (contract: close 1001 on shutdown, then reconnect and resume
with ``after_seq``): the tab says it is reconnecting, comes back by itself, shows what was written
while its server was away exactly once, and sends again."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Browser, expect

from tests.web.conftest import Stack, free_port, open_thread, sign_in, stop


def test_a_server_restart_loses_nothing_and_doubles_nothing(
    browser: Browser, stack: Stack, tmp_path: Path
) -> None:
    stack.control(reset=True)
    port = free_port()
    server, url = stack.start_server(port, tmp_path / "first")
    try:
        context = browser.new_context(base_url=url, viewport={"width": 1280, "height": 800})
        try:
            api = stack.api()  # the session's other server, on the same database
            project = api.project()
            thread = api.thread(project["id"], "Deploy day")
            for i in range(3):
                api.send(thread["id"], f"before {i}")
            page = sign_in(context, api)
            open_thread(page, project, thread)
            log = page.get_by_role("log", name="Messages")
            status = page.get_by_role("status", name="Connection")
            expect(log.get_by_role("article")).to_have_count(3)

            stop(server)  # SIGTERM: a graceful shutdown closes every WebSocket with 1001
            expect(status).to_have_text("Reconnecting")
            for i in range(3):  # written through the other server while this one is down
                api.send(thread["id"], f"while restarting {i}")

            server, _ = stack.start_server(port, tmp_path / "second")
            # Back-off is at most 15 s between attempts (docs/web.md): wait past one.
            expect(status).to_have_text("Connected", timeout=40_000)
            for i in range(3):
                expect(
                    log.get_by_role("article").filter(has_text=f"while restarting {i}")
                ).to_have_count(1)
            stack.control(text="Back again.")
            composer = page.get_by_role("textbox", name="Message")
            composer.fill("after the restart")
            composer.press("Enter")
            sent = log.get_by_role("article").filter(has_text="after the restart")
            expect(sent).to_have_count(1)
            expect(sent).not_to_contain_text("Not sent")
            expect(log.get_by_role("article").filter(has_text="Back again.")).to_have_count(1)
            texts = log.get_by_role("article").all_inner_texts()
            assert len(texts) == len(set(texts)) == 8, texts
            items = api.http.get(f"/threads/{thread['id']}/messages").json()["items"]
            assert [m["content"] for m in items].count("after the restart") == 1
        finally:
            context.close()
    finally:
        stop(server)
