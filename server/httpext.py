"""Three small, explicit fixes to hypercorn's trio TCP server (checked against hypercorn 0.18).

Hypercorn closes an HTTP connection with no request in flight after ``keep_alive_timeout``
through an idle timer (``TCPServer._idle_timeout``) that runs in the connection's task group,
started from connection open and restarted after each response. Two defects:

1. **Sockets left in CLOSE_WAIT.** ``TCPServer.run`` closes the socket only when its task group
   ends, and the group holds the idle timer. When the client closes a connection with no request
   in flight -- it connected and sent nothing (probes, preconnects, scanners), or it closed an idle
   keep-alive connection -- ``_read_data`` sees EOF and returns, but the timer keeps the group
   open, so our socket sits in ``CLOSE_WAIT`` for up to ``keep_alive_timeout`` (75 s in our old
   config): one descriptor per such connection, which any client can multiply at will.
   Fix: when the read loop ends (EOF, a broken or closed stream, a read timeout), the idle timer is
   stopped, since nothing is left for it to guard; the group ends and the socket closes at once.
2. **Connection state changes lost to cancellation.** After a response, hypercorn first tells
   the app the stream is over (``http.disconnect``), on which quart-trio cancels the app's task,
   and then, still in that task, either restarts the idle timer (``Updated(idle=True)``) or
   closes the connection (``Closed``, e.g. after ``Connection: close``, or when the request body
   was not read). Both are cancelled at their first checkpoint: an idle keep-alive connection is
   then never closed (the timer never starts), and a connection that had to close stays open
   half-dead -- its next request is never answered (the "no answer after a 429" defect).
   Fix: ``protocol_send`` handles ``Updated`` and ``Closed`` shielded from cancellation (they
   take a lock, start a task, shut a socket: nothing that can block for long).

3. **Every closed connection a reference cycle.** ``TCPServer.protocol`` sends through the
   server's bound ``protocol_send``, so a finished connection's server, protocol, task group and
   socket objects wait for a full garbage collection (at 10,000 open WebSockets, a stall of a
   second or more) instead of being freed at once. Fix: at the end of ``run`` (its last
   ``_close``, once the connection's task group has exited) the server lets go of its protocol.

``install()`` wraps ``TCPServer._read_data``, ``TCPServer.protocol_send`` and
``TCPServer._close`` once per process.
With no ``read_timeout`` (our configuration) the read loop is hypercorn's without its
``fail_after(inf)``: a cancel scope held open by every idle connection (a WebSocket lives in this
loop for hours) for nothing; memory per connection is what bounds how many a process holds.
A different hypercorn version refuses to install (``RuntimeError`` at import of
``server.runtime``) rather than misbehave silently; re-verify both and bump ``SUPPORTED``.
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from typing import Any

import trio
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.trio import tcp_server
from hypercorn.trio.tcp_server import MAX_RECV

SUPPORTED = ("0.18.",)

_installed = False


def install() -> None:
    """Patch hypercorn once; refuse versions this code was not checked against."""
    global _installed
    if _installed:
        return
    installed = version("hypercorn")
    if not installed.startswith(SUPPORTED):
        raise RuntimeError(
            f"server/httpext.py was checked against hypercorn {SUPPORTED}, found {installed}"
        )
    original_read_data = tcp_server.TCPServer._read_data
    original_protocol_send = tcp_server.TCPServer.protocol_send
    original_close = tcp_server.TCPServer._close

    @functools.wraps(original_read_data)
    async def _read_data(self: Any) -> None:
        if self.config.read_timeout is not None:
            await original_read_data(self)
        else:  # hypercorn's loop, less the cancel scope of an infinite timeout
            receive_some, handle = self.stream.receive_some, self.protocol.handle
            while True:
                try:
                    data = await receive_some(MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
                await handle(RawData(bytes(data)))
                if data == b"":
                    break
            await handle(Closed())
        # The peer is gone (or the stream is): the keep-alive timer has nothing left to guard.
        await self.idle_task.stop()

    @functools.wraps(original_protocol_send)
    async def protocol_send(self: Any, event: Event) -> None:
        if isinstance(event, Updated | Closed):
            # Often called from an app task that is being cancelled (see defect 2).
            with trio.CancelScope(shield=True):
                await original_protocol_send(self, event)
        else:
            await original_protocol_send(self, event)

    @functools.wraps(original_close)
    async def _close(self: Any) -> None:
        await original_close(self)
        task_group = getattr(self, "_task_group", None)
        if task_group is not None and task_group._nursery is None:
            # The last call, from the end of ``run``: the connection's tasks are all done.
            # ``protocol`` sends through this server's bound ``protocol_send``: kept, the
            # pair is a reference cycle that only a full garbage collection frees.
            self.__dict__.pop("protocol", None)

    tcp_server.TCPServer._read_data = _read_data  # type: ignore[method-assign]
    tcp_server.TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
    tcp_server.TCPServer._close = _close  # type: ignore[method-assign]
    _installed = True
