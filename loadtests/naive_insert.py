"""The naive baseline of the write benchmark: what a Python developer would write first.

A quart-trio app with one endpoint, ``POST /messages {"thread", "content"}``, doing one asyncpg
INSERT through trio-asyncio (``aio_as_trio``, pool acquire, fetchrow, release) and answering the
row as JSON. No authentication, no ownership check, no idempotency, no event log, no counters, no
audit: the floor a full server is compared with. Served by hypercorn like Threadline.

    .venv/bin/python loadtests/naive_insert.py --dsn postgresql://... --port 8100
"""

from __future__ import annotations

import argparse
import functools
import signal

import asyncpg
import trio
import trio_asyncio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import jsonify, request
from quart_trio import QuartTrio

SCHEMA = """
CREATE TABLE IF NOT EXISTS naive_messages (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    thread     text NOT NULL,
    content    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


def create_app(pool: asyncpg.Pool) -> QuartTrio:
    app = QuartTrio("naive")

    @app.post("/messages")
    async def post_message():  # type: ignore[no-untyped-def]
        body = await request.get_json()
        async with trio_asyncio.aio_as_trio(pool.acquire()) as conn:
            row = await trio_asyncio.aio_as_trio(conn.fetchrow)(
                "INSERT INTO naive_messages (thread, content) VALUES ($1, $2)"
                " RETURNING id, created_at",
                body["thread"],
                body["content"],
            )
        return jsonify({"id": str(row["id"]), "created_at": row["created_at"].isoformat()}), 201

    return app


async def main(dsn: str, port: int) -> None:
    async with trio_asyncio.open_loop():
        pool = await trio_asyncio.aio_as_trio(asyncpg.create_pool)(dsn, min_size=2, max_size=20)
        await trio_asyncio.aio_as_trio(pool.execute)(SCHEMA)
        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = None
        config.errorlog = None
        shutdown = trio.Event()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def _wait_signal() -> None:
                    async for _ in signals:
                        shutdown.set()
                        return

                nursery.start_soon(_wait_signal)
                app = create_app(pool)
                binds = await nursery.start(
                    functools.partial(serve, app, config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]
                )
                print(f"naive: serving on {binds[0]}", flush=True)
        await trio_asyncio.aio_as_trio(pool.close)()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    trio.run(main, args.dsn, args.port)
