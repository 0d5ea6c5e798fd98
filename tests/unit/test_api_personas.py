"""Personas as the API serves them: the reply's system prompt, the local model they run on."""

from __future__ import annotations

from types import SimpleNamespace

from hivebridge.app import api_personas
from hivebridge.conversation.persona import persona_system_prompt
from hivebridge.db.personas import Persona


def test_personas_on_local_models_are_served_with_their_reply_system_prompt() -> None:
    mira = Persona("mira", "@hive_mira:x", "Mira", "You navigate.", traits={"mood": "calm"})
    remote = Persona("gpt", "@hive_gpt:x", "G", "You are G.", model="gpu1/llama3")
    local_files = {"SmolLM2-135M-Instruct"}
    parts = SimpleNamespace(
        personas=SimpleNamespace(all=lambda: [mira, remote]),
        inference=SimpleNamespace(default_model=None),
        default_model="SmolLM2-135M-Instruct",
        catalogue=SimpleNamespace(resolve=lambda ref: ref),
        models=SimpleNamespace(file=lambda name: object() if name in local_files else None),
    )
    found = api_personas(parts)()  # type: ignore[arg-type]
    assert found["mira"].model == "SmolLM2-135M-Instruct"
    assert found["mira"].system_prompt == persona_system_prompt("You navigate.", {"mood": "calm"})
    assert found["gpt"].model is None  # a remote model: not served by this API
