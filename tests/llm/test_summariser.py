"""The summariser actor: one summary under a race, clean cancellation, summaries in prompts."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import trio

from actors.summariser import Summariser
from server.db import Database
from server.events import ThreadEvent
from server.llm.client import LLMClient
from server.llm.fake_server import FakeLLM
from server.llm.openai_provider import OpenAIProvider
from server.llm.summaries import build_summariser
from server.runtime import open_server
from server.storage.usage import project_spend_this_month, project_usage
from tests.llm.conftest import EventTap, add_message, llm_settings, request_for, seed_thread

LINE = "Alice asked about the migration plan for the billing database and the rollback steps."


async def _wait_in_flight(fake: FakeLLM, n: int) -> None:
    with trio.fail_after(10):
        while fake.stats.in_flight < n:
            await trio.sleep(0.005)


async def test_two_concurrent_summarisers_produce_one_summary(
    tmp_path: Path, fake_llm: FakeLLM, db: Database
) -> None:
    settings = llm_settings(tmp_path, fake_llm, summary_threshold_tokens=100)
    seeded = await seed_thread(db, [f"{i}: {LINE}" for i in range(12)])
    published: list[ThreadEvent] = []
    clients = [LLMClient(OpenAIProvider(settings), settings) for _ in range(2)]
    summarisers = [build_summariser(db, c, settings, published.append) for c in clients]
    outcomes: list[str] = []

    async def one(s: Summariser) -> None:
        outcomes.append(await s.summarise(seeded.thread_id))

    fake_llm.configure(hang=True, text="Alice plans the billing migration with rollback steps.")
    async with trio.open_nursery() as nursery:
        for s in summarisers:
            nursery.start_soon(one, s)
        await _wait_in_flight(fake_llm, 2)  # both have read the same window and asked the model
        fake_llm.configure(hang=False)
    assert sorted(outcomes) == ["ok", "skipped"]
    rows = await db.fetch("SELECT * FROM summaries WHERE thread_id = $1", seeded.thread_id)
    assert len(rows) == 1
    summary = rows[0]
    assert summary["start_seq"] == 1 and 1 <= summary["end_seq"] < 12
    assert summary["content"] == "Alice plans the billing migration with rollback steps."
    events = await db.fetch(
        "SELECT seq, payload FROM thread_events"
        " WHERE thread_id = $1 AND type = 'thread.summarized'",
        seeded.thread_id,
    )
    assert len(events) == 1 and events[0]["seq"] == 13
    assert events[0]["payload"]["end_seq"] == summary["end_seq"]
    assert [e.type for e in published] == ["thread.summarized"] and published[0].seq == 13
    # The model saw the messages as data inside a user turn, never as system turns.
    sent = fake_llm.stats.last_messages
    assert [m["role"] for m in sent] == ["system", "user"] and LINE in sent[1]["content"]
    # Nothing new to summarise now: the next run skips without calling the model.
    requests = fake_llm.stats.requests
    assert await summarisers[0].summarise(seeded.thread_id) == "skipped"
    assert fake_llm.stats.requests == requests
    for c in clients:
        await c.aclose()


async def test_summariser_cancelled_mid_call_leaves_nothing(
    tmp_path: Path, fake_llm: FakeLLM, db: Database
) -> None:
    settings = llm_settings(tmp_path, fake_llm, summary_threshold_tokens=100)
    seeded = await seed_thread(db, [f"{i}: {LINE}" for i in range(12)])
    client = LLMClient(OpenAIProvider(settings), settings)
    summariser = build_summariser(db, client, settings, lambda e: None)
    fake_llm.configure(hang=True)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(summariser.run)
            summariser.poke(seeded.thread_id)
            summariser.poke(seeded.thread_id)  # coalesced: one queued look per thread
            await _wait_in_flight(fake_llm, 1)
            nursery.cancel_scope.cancel()  # what shutdown does to the plugin's nursery
    assert fake_llm.stats.requests == 1
    assert (
        await db.fetchval("SELECT count(*) FROM summaries WHERE thread_id = $1", seeded.thread_id)
        == 0
    )
    assert await db.fetchval("SELECT last_seq FROM threads WHERE id = $1", seeded.thread_id) == 12
    fake_llm.configure(hang=False)
    await client.aclose()


async def test_completed_reply_wakes_the_summariser_and_the_summary_feeds_prompts(
    tmp_path: Path, fake_llm: FakeLLM, pg_dsn: str
) -> None:
    settings = llm_settings(tmp_path, fake_llm, summary_threshold_tokens=100)
    async with open_server(settings, pg_dsn, bind="127.0.0.1:0") as running:
        tap = EventTap(running)
        db = running.services.db
        seeded = await seed_thread(db, [f"{i}: {LINE}" for i in range(12)])
        assert running.services.assistant is not None
        running.services.assistant.start_reply(request_for(seeded))
        t = seeded.thread_id
        await tap.wait_for(lambda: bool(tap.of(t, "thread.summarized")))
        summarized = tap.of(t, "thread.summarized")[0]
        end_seq = summarized.data["end_seq"]
        # The next reply's prompt: system prompt, the summary, then only newer turns.
        fake_llm.configure(text="ok")
        # A new question (one user message gets one reply: messages_one_reply_per_message).
        seeded.message_ids.append(await add_message(db, seeded, "and now?"))
        running.services.assistant.start_reply(request_for(seeded))
        await tap.wait_for(lambda: len(tap.of(t, "assistant.completed")) == 2)
    sent = fake_llm.stats.last_messages
    assert sent[0]["role"] == "system" and sent[1]["role"] == "system"
    assert sent[1]["content"].startswith("Summary of the earlier conversation:")
    contents = [m["content"] for m in sent[2:]]
    assert f"0: {LINE}" not in contents  # summarised away
    assert f"11: {LINE}" in contents or end_seq >= 12


async def test_a_summary_is_charged_to_its_project(
    tmp_path: Path, fake_llm: FakeLLM, db: Database
) -> None:
    settings = llm_settings(tmp_path, fake_llm, summary_threshold_tokens=100)
    seeded = await seed_thread(db, [f"{i}: {LINE}" for i in range(12)])
    client = LLMClient(OpenAIProvider(settings), settings)
    summariser = build_summariser(db, client, settings, lambda event: None)
    fake_llm.configure(text="Alice plans the billing migration with rollback steps.")
    assert await summariser.summarise(seeded.thread_id) == "ok"
    await client.aclose()
    row = await db.fetchrow(
        "SELECT prompt_tokens, completion_tokens, cost_usd, estimated FROM summaries"
        " WHERE thread_id = $1",
        seeded.thread_id,
    )
    assert row is not None and row["cost_usd"] > 0 and row["estimated"] is False
    async with db.transaction() as tx:
        usage = await project_usage(tx, seeded.project_id)
        spend = await project_spend_this_month(tx, seeded.project_id)
    assert usage["month"]["prompt_tokens"] == row["prompt_tokens"]
    assert usage["month"]["completion_tokens"] == row["completion_tokens"]
    assert spend == row["cost_usd"]


async def test_no_summary_when_the_budget_cannot_cover_it(
    tmp_path: Path, fake_llm: FakeLLM, db: Database
) -> None:
    settings = llm_settings(tmp_path, fake_llm, summary_threshold_tokens=100)
    seeded = await seed_thread(db, [f"{i}: {LINE}" for i in range(12)], budget=Decimal("0"))
    client = LLMClient(OpenAIProvider(settings), settings)
    summariser = build_summariser(db, client, settings, lambda event: None)
    requests = fake_llm.stats.requests
    assert await summariser.summarise(seeded.thread_id) == "skipped"
    await client.aclose()
    assert fake_llm.stats.requests == requests, "the provider was called over budget"
    assert (
        await db.fetchval("SELECT count(*) FROM summaries WHERE thread_id = $1", seeded.thread_id)
        == 0
    )
