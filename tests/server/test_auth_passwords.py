"""Argon2id hashing: verification, the dummy path for unknown users, parameter upgrades."""

from __future__ import annotations

from pathlib import Path

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


async def test_unknown_user_path_never_succeeds(tmp_path: Path) -> None:
    hasher = Passwords(make_settings(tmp_path))
    # Even the dummy password itself does not authenticate a missing user.
    assert not await hasher.verify(None, "threadline-dummy-password")
    assert not await hasher.verify(None, "anything")


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
    results: list[bool] = []

    async def one(i: int) -> None:
        encoded = await hasher.hash(f"password-{i}")
        results.append(await hasher.verify(encoded, f"password-{i}"))

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(one, i)
    assert results == [True] * 8
    assert hasher._slots.total_tokens == 2 and hasher._slots.borrowed_tokens == 0
