"""The trio actor runtime and Threadline's actors (connection, thread, summariser, supervisor).

This package never imports quart or hypercorn: transports hand it plain callables.
"""

from __future__ import annotations
