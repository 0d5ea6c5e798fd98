"""The scale-out compose file: two inference nodes, and a bridge config that pools them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ruamel.yaml import YAML

from hivebridge.config import load_config

DOCKER = Path(__file__).resolve().parents[2] / "docker"
BASE, SCALE = DOCKER / "docker-compose.yml", DOCKER / "docker-compose.scale-out.yml"


def test_two_inference_nodes_serve_the_api() -> None:
    services = YAML(typ="safe").load(SCALE.read_text())["services"]
    nodes = [name for name in services if name.startswith("inference-")]
    assert nodes == ["inference-1", "inference-2"]
    for name in nodes:
        assert services[name]["command"][-1] == "serve-api"
    node = load_config(DOCKER / "inference" / "node.yaml", env={})
    assert node.api.enabled and node.api.tokens[0].token_env == "HIVEBRIDGE_INFERENCE_TOKEN"


def test_the_bridge_pools_both_nodes() -> None:
    config = load_config(DOCKER / "bridge" / "config.scale-out.yaml", env={})
    assert [(e.name, e.pool) for e in config.endpoints] == [
        ("inference-1", "pool"),
        ("inference-2", "pool"),
    ]
    assert all(e.affinity.kind == "header" for e in config.endpoints)
    assert config.inference.default_model is not None
    assert config.inference.default_model.startswith("pool/")


def test_compose_validates_offline_when_docker_compose_is_installed() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:  # the structure is checked above; the tool is optional here
        return
    done = subprocess.run(
        [tool, "-f", str(BASE), "-f", str(SCALE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
