"""The operator console: ``hivebridge personas|rooms|stats|backfill`` against a running bridge.

Every verb is one call to the bridge's admin API (docs/operations.md), with the
token from ``--token``, ``HIVEBRIDGE_ADMIN_TOKEN`` or the config file's
``admin_api.token``; the address from ``--url`` or ``admin_api.hostname/port``.
The bridge does the checking (the room commands' own), so the console says
what a room would. Exit status: 0 done, 1 refused or failed (not found, name
taken, bridge unreachable), 2 bad usage (including what the bridge calls a
mistake in the request: HTTP 400).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any, TextIO
from urllib.parse import quote

from .config import ConfigError, load_config

EXIT_FAILED = 1
EXIT_USAGE = 2
#: Seconds one call may take: a spawn joins rooms, a backfill reads a room's history.
TIMEOUT_S = 300.0
#: What the admin listener's address is when it binds every interface.
_ANY = ("", "0.0.0.0", "::", "[::]")


class ConsoleError(Exception):
    """One line to print; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


def add_verbs(sub: Any) -> None:
    """The console's subcommands on the ``hivebridge`` parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="admin API base URL (default: from admin_api in the config)")
    common.add_argument(
        "--token", help="admin API token (default: HIVEBRIDGE_ADMIN_TOKEN, then the config)"
    )
    common.add_argument("--json", action="store_true", help="print the API's JSON answer")

    personas = sub.add_parser("personas", help="list, show, spawn or despawn personas")
    verbs = personas.add_subparsers(dest="verb", required=True, metavar="list|show|spawn|despawn")
    verbs.add_parser("list", parents=[common], help="every persona, with its model")
    show = verbs.add_parser("show", parents=[common], help="one persona's settings and rooms")
    show.add_argument("name")
    spawn = verbs.add_parser(
        "spawn", parents=[common], help="a new persona, in a room, a direct chat, or none yet"
    )
    spawn.add_argument("name")
    spawn.add_argument("--display", help="display name")
    spawn.add_argument("--prompt", help="system prompt")
    spawn.add_argument("--model", help="model id, alias or name")
    where = spawn.add_mutually_exclusive_group()
    where.add_argument("--room", help="room id or alias to join")
    where.add_argument("--dm", metavar="USER_ID", help="open a direct chat with this user")
    despawn = verbs.add_parser("despawn", parents=[common], help="the persona leaves every room")
    despawn.add_argument("name")

    rooms = sub.add_parser("rooms", help="the rooms of the bot and the personas")
    room_verbs = rooms.add_subparsers(dest="verb", required=True, metavar="list")
    room_verbs.add_parser("list", parents=[common], help="members, personas, active or stopped")

    sub.add_parser("stats", parents=[common], help="usage, personas, models, the local engine")

    backfill = sub.add_parser(
        "backfill",
        parents=[common],
        help="store a room's messages the bridge never received (as history, unanswered)",
    )
    backfill.add_argument("room", help="room id or alias")
    backfill.add_argument(
        "--limit", type=int, default=None, help="most messages to read back (default 1000)"
    )


VERBS = ("personas", "rooms", "stats", "backfill")


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run one console verb; prints the answer, returns the exit status."""
    try:
        client = AdminClient(*target(args))
        answer = _call(client, args)
    except ConsoleError as e:
        print(f"hivebridge: {e}", file=err)
        return e.status
    except ConfigError as e:
        print(f"hivebridge: {e}", file=err)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(answer, indent=2, ensure_ascii=False), file=out)
    else:
        print(_text(args, answer), file=out)
    return 0


def target(args: argparse.Namespace) -> tuple[str, str]:
    """The admin API's base URL and token: flags, then the environment, then the config."""
    url: str | None = args.url
    token: str | None = args.token or os.environ.get("HIVEBRIDGE_ADMIN_TOKEN") or None
    if url is None or token is None:
        config = load_config(args.config)
        token = token or config.admin_api.token
        host = config.admin_api.hostname
        host = "127.0.0.1" if host in _ANY else (f"[{host}]" if ":" in host else host)
        url = url or f"http://{host}:{config.admin_api.port}"
    if not token:
        raise ConsoleError(
            "admin_api.token is not set, so the admin API is off: set it in the config "
            "(or HIVEBRIDGE_ADMIN_TOKEN) and restart the bridge, or pass --token",
            EXIT_USAGE,
        )
    return url.rstrip("/"), token


class AdminClient:
    """JSON over HTTP to the admin API; never through a proxy (it is the bridge's own port)."""

    def __init__(self, url: str, token: str, timeout: float = TIMEOUT_S) -> None:
        self.url = url
        self._token = token
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:  # never show the token
        return f"AdminClient({self.url})"

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.url}/api/v1{path}",
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self._token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise _refused(e) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConsoleError(f"cannot reach the admin API at {self.url}: {reason}") from None
        except json.JSONDecodeError:
            raise ConsoleError(f"{self.url} did not answer JSON: is it the admin API?") from None


def _refused(e: urllib.error.HTTPError) -> ConsoleError:
    try:
        message = str(json.loads(e.read())["error"])
    except Exception:
        message = f"HTTP {e.code} {e.reason}"
    if e.code == 401:
        message = "the admin API refused the token (wrong token?)"
    elif e.code == 404 and message in ("Not Found", "HTTP 404 Not Found"):
        message = "no admin API there (is admin_api.token set in the bridge's config?)"
    return ConsoleError(message, EXIT_USAGE if e.code == 400 else EXIT_FAILED)


def _call(client: AdminClient, args: argparse.Namespace) -> Any:
    if args.command == "personas":
        if args.verb == "list":
            return client.call("GET", "/personas")
        name = quote(args.name, safe="")
        if args.verb == "show":
            return client.call("GET", f"/personas/{name}")
        if args.verb == "despawn":
            return client.call("DELETE", f"/personas/{name}")
        body = {"name": args.name, "display": args.display, "prompt": args.prompt}
        body.update(model=args.model, room=args.room, dm=args.dm)
        return client.call("POST", "/personas", {k: v for k, v in body.items() if v is not None})
    if args.command == "rooms":
        return client.call("GET", "/rooms")
    if args.command == "stats":
        return client.call("GET", "/stats")
    limit = {} if args.limit is None else {"limit": args.limit}
    return client.call("POST", f"/rooms/{quote(args.room, safe='')}/backfill", limit)


def _text(args: argparse.Namespace, answer: Any) -> str:
    """What a person reads: the room commands' answers where the API gives them."""
    if isinstance(answer, dict) and isinstance(answer.get("text"), str):
        return str(answer["text"])
    if args.command == "personas":
        personas = answer.get("personas", [])
        if not personas:
            return "No personas yet; hivebridge personas spawn <name> makes one."
        return "Personas:\n" + "\n".join(
            f"{p['name']} — {p['displayname']} ({p['mxid']}), model {p.get('model') or 'default'}"
            for p in personas
        )
    if args.command == "rooms":
        return _rooms_text(answer.get("rooms", []))
    return _stats_text(answer)


def _rooms_text(rooms: list[dict[str, Any]]) -> str:
    if not rooms:
        return "No rooms: neither the bot nor a persona is in one."
    blocks = []
    for r in rooms:
        state = "active" if r.get("active") else "stopped"
        flags = [state] + (["encrypted"] if r.get("encrypted") else [])
        name = f" “{r['name']}”" if r.get("name") else ""
        personas = ", ".join(r.get("personas") or []) or "none"
        if r.get("bot"):
            personas += " (and the bot)"
        blocks.append(
            f"{r['room_id']}{name} — {', '.join(flags)}\n"
            f"  members: {', '.join(r.get('members') or []) or 'none'}\n"
            f"  personas: {personas}\n"
            f"  messages stored: {r.get('messages', 0)}"
        )
    return "\n".join(blocks)


def _stats_text(s: dict[str, Any]) -> str:
    def pair(key: str) -> str:
        v = s.get(key) or {}
        return f"{v.get('total', 0)} / {v.get('today', 0)}"

    def tallies(key: str) -> str:
        return (
            "; ".join(
                f"{t['key']} {t['requests']} req / {t['tokens']} tok "
                f"(today {t['requests_today']} / {t['tokens_today']})"
                for t in s.get(key) or []
            )
            or "none"
        )

    models = s.get("models") or {}
    lines = [
        f"Usage (total / today, UTC {s.get('day', '?')}):",
        f"messages: {pair('messages')}",
        f"persona replies: {pair('replies')}",
        f"ask answers: {pair('asks')}",
        f"tokens: {pair('tokens')}",
        f"top users: {tallies('top_users')}",
        f"per persona: {tallies('by_persona')}",
        f"per model: {tallies('by_model')}",
        f"asked by personas: {tallies('asked_by_personas')}",
        f"personas: {s.get('personas', 0)}; models: {models.get('known', 0)} known, "
        f"{models.get('loaded', 0)} loaded; up {_duration(float(s.get('uptime_s', 0)))}",
    ]
    for name, engine in (s.get("local_engines") or {}).items():
        shown = ", ".join(f"{k} {v}" for k, v in engine.items() if not isinstance(v, dict | list))
        lines.append(f"local engine {name}: {shown}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) + (
        f" (+{int(seconds // 86400)} d)" if seconds >= 86400 else ""
    )
