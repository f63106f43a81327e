"""The naive baseline of the fan-out benchmark: what a Python developer would write first.

A quart-trio app served by hypercorn (like Threadline), no database, no authentication:

* ``GET /ws``: the client sends ``{"op":"subscribe","ref","thread_id"}`` and gets the same reply
  shape as from Threadline; then each subscriber's handler loops ``await websocket.send(frame)``
  over its own bounded trio channel (256 frames; a full channel drops the subscriber);
* ``POST /api/v1/threads/{id}/messages {"content", ...}``: builds a ``message.created`` event
  frame shaped like Threadline's (same keys), serialises it once and ``send_nowait``s the string
  into every subscriber's channel; answers 201 with the message.

    .venv/bin/python loadtests/naive_broadcast.py --port 8100
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import signal
import uuid
from datetime import UTC, datetime
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import request, websocket
from quart_trio import QuartTrio

QUEUE = 256


def create_app() -> QuartTrio:
    app = QuartTrio("naive_broadcast")
    subscribers: dict[str, set[trio.MemorySendChannel[str]]] = {}
    seqs: dict[str, itertools.count[int]] = {}

    @app.post("/api/v1/threads/<thread_id>/messages")
    async def post_message(thread_id: str) -> tuple[dict[str, Any], int]:
        body = await request.get_json()
        seq = next(seqs.setdefault(thread_id, itertools.count(1)))
        message = {
            "id": str(uuid.uuid4()),
            "thread_id": thread_id,
            "seq": seq,
            "role": "user",
            "content": body["content"],
            "author_id": str(uuid.uuid4()),
            "client_msg_id": body.get("client_msg_id"),
            "version": 1,
            "status": None,
            "created_at": datetime.now(UTC).isoformat(),
            "edited_at": None,
            "deleted": False,
        }
        frame = json.dumps(
            {
                "op": "event",
                "thread_id": thread_id,
                "type": "message.created",
                "seq": seq,
                "data": message,
            }
        )
        for channel in list(subscribers.get(thread_id, ())):
            try:
                channel.send_nowait(frame)
            except trio.WouldBlock:
                subscribers[thread_id].discard(channel)
                channel.close()
        return message, 201

    @app.websocket("/ws")
    async def ws() -> None:
        op = json.loads(await websocket.receive())
        thread_id = op["thread_id"]
        send, receive = trio.open_memory_channel[str](QUEUE)
        subscribers.setdefault(thread_id, set()).add(send)
        last_seq = next(seqs.setdefault(thread_id, itertools.count(1))) - 1
        seqs[thread_id] = itertools.count(last_seq + 1)
        reply = {"thread_id": thread_id, "last_seq": last_seq, "replayed": 0}
        await websocket.send(
            json.dumps({"op": "reply", "ref": op["ref"], "ok": True, "data": reply})
        )
        try:
            async for frame in receive:
                await websocket.send(frame)
        finally:
            subscribers[thread_id].discard(send)

    return app


async def main(port: int) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.backlog = 1024
    shutdown = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def _wait_signal() -> None:
                async for _ in signals:
                    shutdown.set()
                    return

            nursery.start_soon(_wait_signal)
            binds = await nursery.start(
                functools.partial(serve, create_app(), config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]
            )
            print(f"naive-broadcast: serving on {binds[0]}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8100)
    trio.run(main, parser.parse_args().port)
