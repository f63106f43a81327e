"""What operators see of the assistant: /readyz, metrics, and logs without secrets."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from structlog.testing import capture_logs

from server import metrics
from server.llm.fake_server import FakeLLM
from server.runtime import open_server
from tests.llm.conftest import EventTap, add_message, llm_settings, request_for, seed_thread

SECRET = "sk-test-secret-do-not-log"


async def test_open_circuit_shows_in_readyz_and_refuses_replies(
    tmp_path: Path, fake_llm: FakeLLM, pg_dsn: str
) -> None:
    settings = llm_settings(
        tmp_path, fake_llm, llm_circuit_failures=2, llm_max_retries=1, llm_circuit_reset_s=600
    )
    fake_llm.configure(fail_next=100, status=502)
    with capture_logs() as logs:
        async with (
            open_server(settings, pg_dsn, bind="127.0.0.1:0") as running,
            httpx.AsyncClient(base_url=running.url, timeout=30) as http,
        ):
            ready = await http.get("/readyz")
            assert ready.status_code == 200
            assert (
                ready.json()["checks"]["llm"] | {"ok": True, "circuit": "closed"}
                == (ready.json()["checks"]["llm"])
            )
            tap = EventTap(running)
            seeded = await seed_thread(running.services.db, ["hello"])
            assert running.services.assistant is not None
            running.services.assistant.start_reply(request_for(seeded))
            t = seeded.thread_id
            await tap.wait_for(lambda: bool(tap.of(t, "assistant.failed")))
            assert tap.of(t, "assistant.failed")[0].data["reason"] == "provider_error"
            assert fake_llm.stats.requests == 2  # one try + one retry, then the circuit opened

            # Reported, but not gating: an open circuit must not take the instance out of
            # rotation (its other work goes on; replies fail fast with circuit_open).
            ready = await http.get("/readyz")
            assert ready.status_code == 200
            llm = ready.json()["checks"]["llm"]
            assert llm["ok"] is False and llm["circuit"] == "open"
            assert llm["provider"] == "openai" and llm["retry_in_s"] > 0
            assert metrics.LLM_CIRCUIT_STATE._value.get() == 2
            exposition = (await http.get("/metrics")).text
            assert "threadline_llm_circuit_state 2.0" in exposition

            # While open, the next reply fails at once and nothing reaches the provider.
            seeded.message_ids.append(await add_message(running.services.db, seeded, "again?"))
            running.services.assistant.start_reply(request_for(seeded))
            await tap.wait_for(lambda: len(tap.of(t, "assistant.failed")) == 2)
            assert tap.of(t, "assistant.failed")[1].data["reason"] == "circuit_open"
            assert fake_llm.stats.requests == 2
            bodies = ready.text + exposition
    assert SECRET not in bodies
    assert SECRET not in json.dumps(logs, default=str)
    assert any(entry["event"] == "llm.circuit" for entry in logs)


async def test_reply_tokens_and_cost_are_counted(
    tmp_path: Path, fake_llm: FakeLLM, pg_dsn: str
) -> None:
    fake_llm.configure(tokens=7)
    completion_before = metrics.LLM_TOKENS.labels(kind="completion")._value.get()
    cost_before = metrics.LLM_COST._value.get()
    ok_before = metrics.LLM_REQUESTS.labels(outcome="ok")._value.get()
    ttft_before = _ttft_count()
    async with open_server(llm_settings(tmp_path, fake_llm), pg_dsn, bind="127.0.0.1:0") as s:
        tap = EventTap(s)
        seeded = await seed_thread(s.services.db, ["count me"])
        assert s.services.assistant is not None
        s.services.assistant.start_reply(request_for(seeded))
        await tap.wait_for(lambda: bool(tap.of(seeded.thread_id, "assistant.completed")))
    usage = tap.of(seeded.thread_id, "assistant.completed")[0].data["usage"]
    assert metrics.LLM_TOKENS.labels(kind="completion")._value.get() - completion_before == 7
    assert abs(metrics.LLM_COST._value.get() - cost_before - usage["cost_usd"]) < 1e-9
    assert metrics.LLM_REQUESTS.labels(outcome="ok")._value.get() - ok_before == 1
    assert _ttft_count() - ttft_before == 1


def _ttft_count() -> float:
    for metric in metrics.LLM_TTFT.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                return sample.value
    return 0.0
