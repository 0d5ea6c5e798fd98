"""A pool of three real llama.cpp servers, one stopped mid-run (``python -m llama_cpp.server``).

The three endpoints share a pool name; rooms are routed by rendezvous hashing
and stickiness. After the first turns one server is stopped: every room is
still answered, the rooms that lived on the stopped server move once and stay
where they went, and no other room moves.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from hivebridge.inference.endpoints import RetryPolicy, RouterConfig
from hivebridge.inference.remote import EndpointTimeouts
from hivebridge.inference.router import InferenceRouter
from hivebridge.inference.types import ChatMessage, SamplingParams, collect
from tests.support.llama_server import LlamaServer, llama_server_missing, start_llama_server

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

ALIAS = "smollm2"
MODEL = f"pool/{ALIAS}"
NODES = ("node0", "node1", "node2")
ROOMS_PER_NODE = 2
PARAMS = SamplingParams(max_tokens=4, temperature=0.0, seed=1)
CONFIG = RouterConfig(
    retry=RetryPolicy(max_attempts=4, backoff_s=0.05),
    timeouts=EndpointTimeouts(connect_s=2.0, read_s=60.0, discovery_s=10.0),
    session_salt=b"pool-failover-test-salt",
)

_missing = llama_server_missing()
if _missing and os.environ.get("CI") == "true":
    pytest.fail(f"CI=true but the real server cannot run: {_missing}", pytrace=False)
if _missing:
    pytest.skip(_missing, allow_module_level=True)


@pytest.fixture
def servers() -> Iterator[list[LlamaServer]]:
    started: list[LlamaServer] = []
    try:
        for _ in NODES:
            started.append(start_llama_server(ALIAS, n_ctx=1024, extra_args=["--n_threads", "1"]))
        yield started
    finally:
        for server in started:
            server.stop()


def session(i: int) -> str:
    return f"!room{i}:example.org|@hive_captain:example.org"


async def test_a_stopped_server_moves_only_its_rooms_once(servers: list[LlamaServer]) -> None:
    router = InferenceRouter(config=CONFIG)
    try:
        for name, server in zip(NODES, servers, strict=True):
            info = await router.add_endpoint(name, server.base_url, pool="pool")
            assert info.pool == "pool" and info.healthy
        assert sorted(router.plan(MODEL)) == list(NODES)  # one model, three replicas
        # Rooms chosen so each node is home to some: rendezvous order decides, not luck.
        rooms: dict[str, list[str]] = {n: [] for n in NODES}
        i = 0
        while any(len(r) < ROOMS_PER_NODE for r in rooms.values()):
            home = router.plan(MODEL, session(i))[0]
            if len(rooms[home]) < ROOMS_PER_NODE:
                rooms[home].append(session(i))
            i += 1
        everyone = [s for r in rooms.values() for s in r]
        history: dict[str, list[ChatMessage]] = {s: [] for s in everyone}
        served: dict[str, list[str]] = {s: [] for s in everyone}

        async def turn(n: int) -> None:
            for s in everyone:
                history[s].append(ChatMessage("user", f"Turn {n}: name a sea creature."))
                gen = router.generate(history[s], PARAMS, session=s, model=MODEL)
                text = await collect(gen)
                assert gen.stats.finish_reason in ("stop", "length") and gen.served_by
                history[s].append(ChatMessage("assistant", text))
                served[s].append(gen.served_by)

        for n in range(2):
            await turn(n)
        for name in NODES:
            assert all(served[s] == [name, name] for s in rooms[name])

        stopped = NODES[1]
        servers[NODES.index(stopped)].stop()
        for n in range(2, 5):
            await turn(n)  # every room is answered: collect() raised for none

        for s in rooms[stopped]:
            before, after = served[s][:2], served[s][2:]
            assert before == [stopped, stopped]
            assert after[0] != stopped and after == [after[0]] * 3  # moved once, stayed
            assert router.sticky_endpoint(s) == after[0]
        for name in NODES:
            if name != stopped:
                for s in rooms[name]:
                    assert served[s] == [name] * 5  # no other room moved
    finally:
        await router.aclose()
