"""Password hashing with Argon2id, off the event loop and bounded in concurrency.

Argon2 is slow and memory-hungry by design (64 MiB per hash by default), so hashing runs in a
worker thread (the C library releases the GIL) and at most ``max_concurrent`` hashes run at once:
a burst of logins queues instead of exhausting memory. Cancelling a caller abandons its wait for
a slot; a hash already running in a thread finishes in the background and is discarded.
"""

from __future__ import annotations

import argon2
import trio
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from server.config import Settings

MIN_PASSWORD_CHARS = 8
# Beyond this a password is not stronger, only more expensive to hash: refuse it.
MAX_PASSWORD_CHARS = 1024


class Passwords:
    """Hash and verify passwords with the configured Argon2id parameters."""

    def __init__(self, settings: Settings, *, max_concurrent: int = 4) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
            type=argon2.Type.ID,
        )
        self._slots = trio.CapacityLimiter(max_concurrent)
        # Verified when the e-mail is unknown, so that a miss costs as long as a wrong password.
        self._dummy_hash = self._hasher.hash("threadline-dummy-password")

    async def hash(self, password: str) -> str:
        """The encoded Argon2id hash of ``password``."""
        return await trio.to_thread.run_sync(self._hasher.hash, password, limiter=self._slots)

    async def verify(self, encoded: str | None, password: str) -> bool:
        """True if ``password`` matches ``encoded``; with ``encoded`` None, spend the same time
        verifying a dummy hash and return False."""
        target = encoded if encoded is not None else self._dummy_hash
        ok = await trio.to_thread.run_sync(self._verify, target, password, limiter=self._slots)
        return ok and encoded is not None

    def needs_rehash(self, encoded: str) -> bool:
        """True when ``encoded`` was made with other parameters than the configured ones."""
        try:
            return self._hasher.check_needs_rehash(encoded)
        except InvalidHashError:
            return True

    def _verify(self, encoded: str, password: str) -> bool:
        try:
            return self._hasher.verify(encoded, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
