"""Command line: run the bridge, generate its registration, migrate, run the demo, or
talk to a running bridge (``personas``, ``rooms``, ``stats``, ``backfill``: console.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from .config import ConfigError, load_config

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hivebridge", description="Matrix appservice hosting AI personas."
    )
    parser.add_argument("-c", "--config", default="config.yaml", help="config file")
    parser.add_argument(
        "-r", "--registration", default="registration.yaml", help="registration file"
    )
    parser.add_argument(
        "-g",
        "--generate-registration",
        action="store_true",
        help="write the registration (fresh tokens) and exit",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the bridge (default)")
    sub.add_parser("migrate", help="bring the database schema up to date and exit")
    sub.add_parser(
        "serve-api",
        help="serve only the OpenAI-compatible API on the local models (an inference node: "
        "no homeserver, no database; docs/scale-out.md)",
    )
    demo = sub.add_parser(
        "demo", help="start a private Synapse and the bridge, and have a persona answer"
    )
    demo.add_argument("--keep", action="store_true", help="keep everything running")
    demo.add_argument("--message", default="Hello! Who are you?", help="what the human says")
    demo.add_argument("--dir", default=None, help="working directory (default: a temp dir)")
    demo.add_argument(
        "--encrypted",
        action="store_true",
        help="make alice's direct chat end-to-end encrypted (her app encrypts)",
    )
    from .console import add_verbs

    add_verbs(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .console import VERBS

    if args.command in VERBS:
        from .console import run as run_console

        return run_console(args)
    if args.command == "demo":
        from .demo import run_demo

        return asyncio.run(
            run_demo(
                keep=args.keep, message=args.message, workdir=args.dir, encrypted=args.encrypted
            )
        )
    try:
        config = load_config(args.config)
        if args.generate_registration:
            from .registration import write_registration

            write_registration(config, args.registration)
            print(f"wrote {args.registration}; add it to app_service_config_files and restart")
            return 0
        if args.command == "migrate":
            from .db.migrations import upgrade_sync

            config.make_data_dir()
            upgrade_sync(config.database_url())
            print("database is up to date")
            return 0
        from .app import run
        from .logs import redactor, setup_logging
        from .registration import load_tokens

        setup_logging(config.logging.level)
        redactor.add(*(t.resolved() for t in config.api.tokens))
        if args.command == "serve-api":
            from .app import ApiNode, serve

            if not config.api.tokens:
                raise ConfigError("api.tokens", "serve-api needs at least one token")
            config.make_data_dir()
            return asyncio.run(serve(ApiNode(config)))
        redactor.add(
            *load_tokens(config, args.registration),
            config.admin_api.token,
            config.encryption.pickle_key,
        )
        config.make_data_dir()
        return asyncio.run(run(config, args.registration))
    except ConfigError as e:
        print(f"hivebridge: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 0
    return 0
