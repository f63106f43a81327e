"""The ``threadline`` command: serve, migrate, reconcile, fake-llm."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from server.config import ConfigError, Settings, load_settings
from server.logs import configure_logging

if TYPE_CHECKING:
    from server.embedded_pg import EmbeddedPostgres


@contextlib.contextmanager
def database_dsn(settings: Settings) -> Iterator[tuple[str, EmbeddedPostgres | None]]:
    """Yield (dsn, embedded): the configured external server, else the embedded one's handle."""
    if settings.database_url is not None:
        yield settings.database_url.get_secret_value(), None
        return
    from server.embedded_pg import open_embedded

    with open_embedded(settings.data_dir) as handle:
        yield handle.dsn, handle


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import trio

    from server import migrate
    from server.runtime import serve_until_signalled

    overrides = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if overrides:
        settings = settings.model_copy(update=overrides)
    with database_dsn(settings) as (dsn, embedded):
        if embedded is not None:
            migrate.upgrade(dsn)
        trio.run(serve_until_signalled, settings, dsn, embedded)
    return 0


def _cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from server import migrate

    with database_dsn(settings) as (dsn, _):
        if args.direction == "up":
            migrate.upgrade(dsn, args.to or "head")
        else:
            migrate.downgrade(dsn, args.to or "-1")
    return 0


def _cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    import json

    import trio

    from server.db import Database
    from server.storage.reconcile import reconcile

    async def _run(dsn: str) -> dict[str, int]:
        async with Database.connect(dsn, min_size=1, max_size=2) as db:
            return await reconcile(db)

    with database_dsn(settings) as (dsn, _):
        report = trio.run(_run, dsn)
    print(json.dumps(report))
    return 0


def _cmd_fake_llm(args: argparse.Namespace, settings: Settings) -> int:
    from server.llm.fake_server import main as fake_main

    return int(fake_main(host=args.host, port=args.port))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="threadline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve HTTP + WebSocket (migrates the embedded database)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.set_defaults(handler=_cmd_serve)

    mig = sub.add_parser("migrate", help="schema migrations")
    mig.add_argument("direction", choices=["up", "down"])
    mig.add_argument("--to", default=None, help="target revision (up: head; down: one step)")
    mig.set_defaults(handler=_cmd_migrate)

    rec = sub.add_parser("reconcile", help="find and repair counter drift; print a JSON report")
    rec.set_defaults(handler=_cmd_reconcile)

    fake = sub.add_parser("fake-llm", help="a local OpenAI-compatible server for tests")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8001)
    fake.set_defaults(handler=_cmd_fake_llm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``threadline`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print("threadline: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level, settings.node_id)
    return int(args.handler(args, settings))


if __name__ == "__main__":
    sys.exit(main())
