"""Memory and storage that hostile or runaway input must not grow without bound."""

from __future__ import annotations

import pytest

from hivebridge.catalogue import ModelCatalogue
from hivebridge.db import open_database
from hivebridge.db.catalogue import CatalogueStore
from hivebridge.inference.local import EngineSettings, LocalModels
from hivebridge.inference.remote import MAX_MODELS_PER_ENDPOINT
from hivebridge.inference.router import InferenceRouter
from tests.support.fake_openai import FakeOpenAI


async def test_an_endpoint_listing_ten_thousand_models_adds_a_bounded_number(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: every listed name became a catalogue row (10,000 rows, and more each refresh)."""
    names = [f"model-{i:05d}" for i in range(10_000)] + ["x" * 5000, "bad\nname"]
    db = await open_database(sqlite_url)
    local = LocalModels(lambda: [], EngineSettings())
    router = InferenceRouter()
    try:
        await local.rescan()
        catalogue = ModelCatalogue(CatalogueStore(db), router, local)
        await catalogue.load()
        endpoint = FakeOpenAI(models=names)
        await endpoint.start()
        try:
            info = await router.add_endpoint("many", endpoint.base_url)
            await catalogue.sync()
        finally:
            await endpoint.stop()
        assert len(info.models) == MAX_MODELS_PER_ENDPOINT
        assert info.models[0] == "many/model-00000"
        rows = await CatalogueStore(db).models()
        assert len(rows) == MAX_MODELS_PER_ENDPOINT
        assert "lists 10002 models; keeping 256" in caplog.text
    finally:
        await router.aclose()
        await local.close()
        await db.stop()
