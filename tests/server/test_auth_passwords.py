"""Argon2id hashing: verification, the dummy path for unknown users, parameter upgrades."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import argon2
import trio

from server.passwords import Passwords
from tests.conftest import make_settings


async def test_hash_and_verify(tmp_path: Path) -> None:
    hasher = Passwords(make_settings(tmp_path))
    encoded = await hasher.hash("correct horse")
    assert encoded.startswith("$argon2id$") and "correct horse" not in encoded
    assert await hasher.verify(encoded, "correct horse")
    assert not await hasher.verify(encoded, "Correct horse")
    assert not await hasher.verify("not-a-hash", "correct horse")


class _Counting:
    """Argon2's PasswordHasher with its ``hash``/``verify`` calls observed: how many run at once
    (peak), and which hashes were verified. Each call lingers (at most ``linger_s``) until
    ``meet`` calls are inside together, so calls that may overlap do overlap."""

    def __init__(self, inner: argon2.PasswordHasher, meet: int = 1, linger_s: float = 0) -> None:
        self.inner = inner
        self.meet = meet
        self.linger_s = linger_s
        self.active = 0
        self.peak = 0
        self.verified: list[str] = []
        self._cond = threading.Condition()

    def _enter(self) -> None:
        with self._cond:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self.active >= self.meet, timeout=self.linger_s)

    def _leave(self) -> None:
        with self._cond:
            self.active -= 1

    def hash(self, password: str) -> str:
        self._enter()
        try:
            return self.inner.hash(password)
        finally:
            self._leave()

    def verify(self, encoded: str, password: str) -> bool:
        self._enter()
        try:
            self.verified.append(encoded)
            return self.inner.verify(encoded, password)
        finally:
            self._leave()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_unknown_user_path_never_succeeds(tmp_path: Path) -> None:
    hasher = Passwords(make_settings(tmp_path))
    counting = _Counting(hasher._hasher)
    hasher._hasher = counting  # type: ignore[assignment]
    # Even the dummy password itself does not authenticate a missing user.
    assert not await hasher.verify(None, "threadline-dummy-password")
    assert not await hasher.verify(None, "anything")
    # ...and each miss did the work a real user's check does: one Argon2 verification, of a
    # hash made with the configured parameters (so it costs the same time and memory).
    assert len(counting.verified) == 2
    dummy = counting.verified[0]
    assert dummy.startswith("$argon2id$") and not hasher.needs_rehash(dummy)
    real = await hasher.hash("a real password")
    assert dummy.split("$")[2:4] == real.split("$")[2:4]  # version and m,t,p parameters


async def test_needs_rehash_follows_the_parameters(tmp_path: Path) -> None:
    old = Passwords(make_settings(tmp_path, argon2_time_cost=1))
    new = Passwords(make_settings(tmp_path, argon2_time_cost=2))
    encoded = await old.hash("pw-12345678")
    assert not old.needs_rehash(encoded)
    assert new.needs_rehash(encoded)
    assert new.needs_rehash("garbage")
    assert await new.verify(encoded, "pw-12345678")  # old hashes still verify


async def test_concurrent_hashing_is_bounded(tmp_path: Path) -> None:
    hasher = Passwords(make_settings(tmp_path), max_concurrent=2)
    # Each call lingers until a third one is inside with it, which the bound of 2 never allows
    # (so each lingers 0.3 s, long enough for its partner to join): the peak is then exactly 2.
    # Without the bound all eight would be inside together.
    counting = _Counting(hasher._hasher, meet=3, linger_s=0.3)
    hasher._hasher = counting  # type: ignore[assignment]
    encoded: dict[int, str] = {}

    async def hash_one(i: int) -> None:
        encoded[i] = await hasher.hash(f"password-{i}")

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(hash_one, i)
    assert counting.peak == 2, counting.peak
    counting.peak = 0
    results: list[bool] = []

    async def verify_one(i: int) -> None:
        results.append(await hasher.verify(encoded[i], f"password-{i}"))

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(verify_one, i)
    assert counting.peak == 2, counting.peak
    assert results == [True] * 8
