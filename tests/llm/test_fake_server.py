"""``threadline fake-llm`` as a process, speaking the OpenAI wire format."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.llm.fake_server import FakeLLM


@pytest.fixture
def fake_process() -> Iterator[str]:
    exe = Path(sys.executable).parent / "threadline"
    proc = subprocess.Popen(
        [str(exe), "fake-llm", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "THREADLINE_LOG_FORMAT": "json"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the server has bound its port
        assert line.startswith("fake-llm: serving on http://127.0.0.1:"), line
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_fake_llm_process_streams_chat_completions(fake_process: str) -> None:
    base = fake_process
    with httpx.Client(timeout=5) as http:
        models = http.get(f"{base}/models").json()
        assert models["data"][0]["id"] == "fake-gpt"
        http.post(base.removesuffix("/v1") + "/control", json={"tokens": 3}).raise_for_status()
        body = {
            "model": "fake-gpt",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with http.stream("POST", f"{base}/chat/completions", json=body) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == "the quick brown"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
        plain = http.post(f"{base}/chat/completions", json={**body, "stream": False}).json()
        assert plain["choices"][0]["message"]["content"] == "the quick brown"
        stats = http.get(base.removesuffix("/v1") + "/control/stats").json()
        assert stats["requests"] == 2 and stats["completed"] == 2


def test_unknown_controls_are_refused() -> None:
    fake = FakeLLM()
    with pytest.raises(ValueError, match="unknown controls"):
        fake.configure(fail_nxt=1)
