"""Configuration: validated at start-up, one clear line per bad value, secrets never printed."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from server.cli import main
from server.config import DEFAULT_PRICE, ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("THREADLINE_"):
            monkeypatch.delenv(key)


def test_defaults_need_nothing() -> None:
    settings = load_settings()
    assert settings.database_url is None
    assert settings.port == 8000
    assert settings.ws_max_message_bytes == 64 * 1024
    assert settings.heartbeat_interval_s == 20
    assert settings.heartbeat_timeout_s == 10
    assert settings.ws_outbound_queue == 256
    assert settings.gc_threshold == 10_000
    assert settings.origins == ["http://127.0.0.1:8000", "http://localhost:8000"]


def test_each_bad_value_gets_its_own_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADLINE_PORT", "eighty")
    monkeypatch.setenv("THREADLINE_DATABASE_URL", "mysql://root:hunter2@db/x")
    monkeypatch.setenv("THREADLINE_LLM_PRICES", "{not json")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    problems = caught.value.problems
    assert any(p.startswith("THREADLINE_PORT:") for p in problems)
    assert any(p.startswith("THREADLINE_DATABASE_URL:") for p in problems)
    assert any(p.startswith("THREADLINE_LLM_PRICES:") for p in problems)
    assert "hunter2" not in str(caught.value)


def test_production_requires_a_jwt_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADLINE_ENV", "production")
    with pytest.raises(ConfigError, match="THREADLINE_JWT_SECRET"):
        load_settings()


def test_csv_and_json_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADLINE_ALLOWED_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv(
        "THREADLINE_LLM_PRICES", '{"my-model": {"prompt_per_1k": 0.5, "completion_per_1k": 1}}'
    )
    settings = load_settings()
    assert settings.origins == ["https://a.example", "https://b.example"]
    assert settings.price_for("my-model").prompt_per_1k == 0.5
    assert settings.price_for("gpt-4o-mini").prompt_per_1k > 0
    assert settings.price_for("never-heard-of-it") == DEFAULT_PRICE
    assert DEFAULT_PRICE.completion_per_1k > 0, "an unknown model must never be free"


def test_generated_signing_key_is_private_and_stable(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "d")
    key = settings.signing_key()
    assert len(key) >= 32
    assert settings.signing_key() == key
    assert (tmp_path / "d" / "jwt_secret").stat().st_mode & 0o777 == 0o600


def test_cli_reports_bad_configuration_without_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("THREADLINE_DATABASE_URL", "redis://:s3cret-value@cache")
    assert main(["migrate", "up"]) == 2
    err = capsys.readouterr().err
    assert "THREADLINE_DATABASE_URL" in err
    assert "s3cret-value" not in err


def test_serve_sets_the_collectors_first_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.runtime import tune_collector

    monkeypatch.setenv("THREADLINE_GC_THRESHOLD", "12345")
    before = gc.get_threshold()
    try:
        tune_collector(load_settings())
        assert gc.get_threshold() == (12345, *before[1:])
        tune_collector(load_settings(gc_threshold=before[0]))
        assert gc.get_threshold() == before
    finally:
        gc.set_threshold(*before)
    assert load_settings(gc_threshold=10_000).gc_threshold == 10_000
    assert load_settings().gc_freeze is True
    monkeypatch.setenv("THREADLINE_GC_THRESHOLD", "0")  # would turn the collector off
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert any(p.startswith("THREADLINE_GC_THRESHOLD:") for p in caught.value.problems)


def test_the_start_up_heap_is_frozen_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from server import gcwatch
    from server.runtime import freeze_started, tune_collector

    assert gc.get_freeze_count() == 0
    try:
        monkeypatch.setenv("THREADLINE_GC_FREEZE", "false")
        freeze_started(load_settings())
        assert gc.get_freeze_count() == 0
        monkeypatch.delenv("THREADLINE_GC_FREEZE")
        freeze_started(load_settings())
        assert gc.get_freeze_count() > 10_000  # this process's modules, classes, functions
    finally:
        gc.unfreeze()
    # Every collection is timed, by generation, once the collector is tuned.
    before = gc.get_threshold()
    try:
        tune_collector(load_settings())
        pauses = gcwatch.install()
        full = sum(pauses.counts[2])
        gc.collect()
        assert sum(pauses.counts[2]) == full + 1
        assert pauses.longest[2] > 0
    finally:
        gc.set_threshold(*before)
