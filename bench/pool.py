"""A pool of three llama.cpp servers behind the bridge's router: sticky vs round robin.

Three servers on 127.0.0.1, one thread each, each with a prompt cache that
holds several rooms: the C++ ``llama-server`` (6 slots, the KV of each slot is
its cache; host-RAM prompt cache off so the slots are the whole cache) when
``HIVEBRIDGE_LLAMA_SERVER`` (or /work/notes/LLAMA_SERVER_READY) names a built
binary, else ``python -m llama_cpp.server --cache true``. Every slot is warmed
with the persona's prompt first, so both modes start from the same state.

12 rooms x 6 turns (each room one persona conversation, rooms concurrent
within a turn, in a different order each turn) go through the bridge's
:class:`InferenceRouter` with the endpoints in one pool, once with
sticky/rendezvous routing and once round robin, each on fresh servers.
Measured per mode: prompt tokens the servers evaluated (llama-server's
``llamacpp:prompt_tokens_total``; the router's usage figures otherwise) and
time to first token p50/p95. Then, sticky again on fresh servers, one server
is stopped after turn 3: every room must still be answered; the rooms of the
stopped server move once and stay; no other room moves.

Goal: ``evaluated_sticky <= 0.4 x evaluated_round_robin``. Prints progress to
stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from _common import emit, log, model_path, now, persona_prompt

from hivebridge.devserver.process import ManagedProcess, free_port
from hivebridge.inference.endpoints import RetryPolicy, RouterConfig
from hivebridge.inference.remote import EndpointTimeouts
from hivebridge.inference.router import InferenceRouter
from hivebridge.inference.types import ChatMessage, SamplingParams, collect

NODES = 3
ROOMS = 12
TURNS = 6
MAX_TOKENS = 16
SLOTS = 6
ALIAS = "smollm2"
MODEL = f"pool/{ALIAS}"
PERSONA = ChatMessage("system", persona_prompt("Captain Mira", 12))
STOP_AFTER_TURN = 3  # the failover phase stops one server after this many turns
READY_NOTE = Path("/work/notes/LLAMA_SERVER_READY")


def llama_server_binary() -> Path | None:
    env = os.environ.get("HIVEBRIDGE_LLAMA_SERVER")
    if env:
        return Path(env)
    if READY_NOTE.is_file():
        path = Path(READY_NOTE.read_text().strip())
        if path.is_file():
            return path
    return None


@dataclass
class Node:
    name: str
    proc: ManagedProcess
    port: int
    cpp: bool

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.stop()
        self.proc.log_path.unlink(missing_ok=True)


def start_node(name: str, binary: Path | None) -> Node:
    port = free_port()
    fd, log_name = tempfile.mkstemp(prefix=f"pool-{name}-", suffix=".log")
    os.close(fd)
    model = str(model_path())
    if binary is not None:
        argv = [
            str(binary), "-m", model, "--host", "127.0.0.1", "--port", str(port),
            "-a", ALIAS, "-c", str(SLOTS * 1536), "-np", str(SLOTS), "--no-kv-unified",
            "-cram", "0", "-t", "1", "-tb", "1", "--no-webui", "--metrics",
        ]  # fmt: skip
    else:
        argv = [
            sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--model_alias", ALIAS, "--n_ctx", "2048",
            "--interrupt_requests", "false", "--n_threads", "1", "--n_threads_batch", "1",
            "--cache", "true", "--cache_type", "ram", "--cache_size", str(1 << 30),
        ]  # fmt: skip
    proc = ManagedProcess(argv, log_path=Path(log_name), name=name)
    proc.spawn()
    node = Node(name, proc, port, binary is not None)
    proc.wait_http_sync(f"{node.root}/v1/models", 120)
    return node


async def evaluated_by_servers(http: aiohttp.ClientSession, nodes: list[Node]) -> int | None:
    """Prompt tokens the servers evaluated so far (llama-server's /metrics), or None."""
    total = 0
    for node in nodes:
        if not node.cpp or not node.proc.running():
            return None
        async with http.get(f"{node.root}/metrics") as resp:
            text = await resp.text()
        found = re.search(r"^llamacpp:prompt_tokens_total\s+([0-9.e+]+)", text, re.M)
        if found is None:
            return None
        total += int(float(found.group(1)))
    return total


async def warm(http: aiohttp.ClientSession, nodes: list[Node]) -> None:
    """Put the persona's prompt into every slot of every server."""
    body = {
        "model": ALIAS,
        "messages": [{"role": PERSONA.role, "content": PERSONA.content}],
        "max_tokens": 1,
        "temperature": 0,
    }

    async def one(node: Node, slot: int) -> None:
        extra = {"id_slot": slot, "cache_prompt": True} if node.cpp else {}
        async with http.post(f"{node.root}/v1/chat/completions", json={**body, **extra}) as r:
            r.raise_for_status()
            await r.read()

    for node in nodes:
        await asyncio.gather(*(one(node, s) for s in range(SLOTS if node.cpp else 1)))


def room_session(room: int) -> str:
    return f"!room{room}:bench.example|@hive_captain:bench.example"


def question(room: int, turn: int) -> ChatMessage:
    topics = ["tides", "knots", "storms", "stars", "whales", "maps", "sails", "the galley"]
    topic = topics[(room * 7 + turn * 3) % len(topics)]
    return ChatMessage("user", f"Room {room}, question {turn + 1}: what about {topic}?")


@dataclass
class Run:
    ttft: list[float] = field(default_factory=list)
    usage_evaluated: int = 0
    served: dict[int, list[str]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)


async def run_mode(
    routing: str, binary: Path | None, *, stop_after: int | None = None
) -> tuple[Run, int | None, str | None]:
    """One phase on fresh servers; returns the run, server-side evaluated tokens and
    the name of the server stopped (failover phase)."""
    nodes = [start_node(f"node{i}", binary) for i in range(NODES)]
    config = RouterConfig(
        routing=routing,
        retry=RetryPolicy(max_attempts=4, backoff_s=0.05),
        timeouts=EndpointTimeouts(connect_s=2.0, read_s=300.0, discovery_s=30.0),
        session_salt=b"bench-pool-salt-0123456789",
    )
    router = InferenceRouter(config=config)
    run = Run(served={r: [] for r in range(ROOMS)})
    stopped: str | None = None
    timeout = aiohttp.ClientTimeout(total=600)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for node in nodes:
                await router.add_endpoint(node.name, f"{node.root}/v1", pool="pool")
            await warm(http, nodes)
            before = await evaluated_by_servers(http, nodes)
            history = {r: [PERSONA] for r in range(ROOMS)}

            async def ask(room: int, turn: int) -> None:
                history[room].append(question(room, turn))
                params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, seed=room)
                gen = router.generate(
                    history[room], params, session=room_session(room), model=MODEL
                )
                try:
                    text = await collect(gen)
                except Exception as exc:
                    run.failed.append(f"room {room} turn {turn}: {exc}")
                    text = ""
                history[room].append(ChatMessage("assistant", text))
                run.served[room].append(gen.served_by or "-")
                if gen.stats.ttft_s is not None:
                    run.ttft.append(gen.stats.ttft_s)
                run.usage_evaluated += gen.stats.evaluated_tokens

            for turn in range(TURNS):
                if stop_after is not None and turn == stop_after:
                    home = run.served[0][-1]
                    victim = next(n for n in nodes if n.name == home)
                    log(f"stopping {victim.name} (pid {victim.proc.pid}) after turn {turn}")
                    victim.stop()
                    stopped = victim.name
                # Rooms speak in a different order each turn, as they do: with a fixed
                # order round robin would give every room the same server every turn.
                order = random.Random(turn).sample(range(ROOMS), ROOMS)
                t0 = now()
                await asyncio.gather(*(ask(r, turn) for r in order))
                log(f"{routing}: turn {turn + 1} in {now() - t0:.1f}s")
            after = await evaluated_by_servers(http, nodes) if stopped is None else None
    finally:
        await router.aclose()
        for node in nodes:
            if node.proc.running():
                node.stop()
    evaluated = after - before if before is not None and after is not None else None
    return run, evaluated, stopped


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 3)


async def main() -> None:
    binary = llama_server_binary()
    log(f"servers: {'llama-server ' + str(binary) if binary else 'llama_cpp.server --cache'}")
    results: dict[str, object] = {}
    evaluated: dict[str, int] = {}
    for routing in ("sticky", "round_robin"):
        run, server_evaluated, _ = await run_mode(routing, binary)
        if run.failed:
            raise SystemExit(f"{routing}: requests failed: {run.failed[:3]}")
        evaluated[routing] = (
            server_evaluated if server_evaluated is not None else run.usage_evaluated
        )
        results[f"evaluated_{routing}"] = evaluated[routing]
        results[f"ttft_p50_{routing}"] = pct(run.ttft, 50)
        results[f"ttft_p95_{routing}"] = pct(run.ttft, 95)
        moves = sum(len(set(s)) > 1 for s in run.served.values())
        log(f"{routing}: evaluated {evaluated[routing]}, rooms on >1 server {moves}")

    run, _, stopped = await run_mode("sticky", binary, stop_after=STOP_AFTER_TURN)
    homes = {r: s[STOP_AFTER_TURN - 1] for r, s in run.served.items()}
    of_stopped = [r for r, h in homes.items() if h == stopped]
    moved = [r for r, s in run.served.items() if s[STOP_AFTER_TURN] != homes[r]]
    others_moved = [r for r, s in run.served.items() if r not in of_stopped and len(set(s)) != 1]
    stayed = all(
        len(set(run.served[r][STOP_AFTER_TURN:])) == 1 and run.served[r][-1] != stopped
        for r in of_stopped
    )
    ratio = evaluated["sticky"] / max(1, evaluated["round_robin"])
    emit(
        {
            **results,
            "evaluated_ratio": round(ratio, 3),
            "goal_ratio_max": 0.4,
            "rooms_moved_on_failure": len(moved),
            "rooms_of_stopped_server": len(of_stopped),
            "other_rooms_moved": len(others_moved),
            "moved_rooms_stayed": stayed,
            "failed_requests_on_failure": len(run.failed),
            "servers": "llama-server" if binary else "llama_cpp.server --cache",
            "workload": f"{ROOMS} rooms x {TURNS} turns x {MAX_TOKENS} tokens, {NODES} servers"
            f" x 1 thread, {SLOTS if binary else 1} slots each",
            "evaluated_source": "server /metrics" if binary else "usage",
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=TURNS)
    parser.add_argument("--rooms", type=int, default=ROOMS)
    args = parser.parse_args()
    TURNS, ROOMS = args.turns, args.rooms
    asyncio.run(main())
