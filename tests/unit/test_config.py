from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hivebridge.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.yaml"

MINIMAL = """\
homeserver:
  address: http://127.0.0.1:8008
  domain: example.org
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_example_config_loads_with_every_section() -> None:
    config = load_config(EXAMPLE, env={})
    assert config.homeserver.domain == "example.org"
    assert config.appservice.hostname == "127.0.0.1"
    assert config.database.url.startswith("sqlite:")
    assert config.default_persona.name
    assert config.tools.weather.base_url == "https://wttr.in" and config.tools.default == ()


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), env={})
    assert config.bot_mxid == "@hive_bot:example.org"
    assert config.persona_mxid("assistant") == "@hive_assistant:example.org"
    assert config.inference.max_tokens <= config.inference.max_tokens_limit


def test_relative_sqlite_path_lives_under_data_dir(tmp_path: Path) -> None:
    text = MINIMAL + f"data_dir: {tmp_path}/state\n"
    config = load_config(write(tmp_path, text), env={})
    assert config.database_url() == f"sqlite:{tmp_path}/state/hivebridge.db"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("homeserver:\n  domain: example.org\n", "homeserver.address"),
        (MINIMAL + "appservice:\n  port: 70000\n", "appservice.port"),
        (MINIMAL + "appservice:\n  port: many\n", "appservice.port"),
        (MINIMAL + "appservise:\n  port: 1\n", "appservise"),
        (MINIMAL + "inference:\n  temperature: 3\n", "inference.temperature"),
        (MINIMAL + "database:\n  url: mysql://x\n", "database.url"),
        (MINIMAL + "permissions:\n  owners: [alice]\n", "permissions.owners"),
        (MINIMAL + "default_persona:\n  name: Bad Name\n", "default_persona.name"),
        (MINIMAL + "inference:\n  local:\n    n_ctx: 10\n", "inference.local.n_ctx"),
        (MINIMAL + "tools:\n  max_hops: 11\n", "tools.max_hops"),
        (MINIMAL + "tools:\n  weather:\n    base_url: ftp://x\n", "tools.weather.base_url"),
        (MINIMAL + "tools:\n  default: get_weather\n", "tools.default"),
        (
            MINIMAL + "appservice:\n  max_transaction_size: 1MiB\n",
            "appservice.max_transaction_size",
        ),
        (MINIMAL + "inference:\n  remote_deadline_s: 0\n", "inference.remote_deadline_s"),
        (
            MINIMAL + "security:\n  endpoint_key_env: [HIVEBRIDGE_AS_TOKEN]\n",
            "security.endpoint_key_env",
        ),
        (
            MINIMAL + "endpoints:\n  - {name: a, url: 'http://a/v1', pool: b}\n"
            "  - {name: b, url: 'http://b/v1'}\n",
            "endpoints[1].name",
        ),
    ],
)
def test_bad_key_is_named(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), env={})
    assert err.value.key == key
    assert key in str(err.value)


def test_env_overrides_secrets(tmp_path: Path) -> None:
    env = {"HIVEBRIDGE_AS_TOKEN": "as-from-env", "HIVEBRIDGE_DATABASE_URL": "postgres://db/x"}
    config = load_config(write(tmp_path, MINIMAL), env=env)
    assert config.appservice.as_token == "as-from-env"
    assert config.database.url == "postgres://db/x"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hivebridge", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "appservice:\n  port: -1\n")
    result = run_cli("-c", str(path), "-g", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "appservice.port" in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_missing_config_exits_2(tmp_path: Path) -> None:
    result = run_cli("-c", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "file not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_invalid_yaml_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, "homeserver: [unclosed\n")
    result = run_cli("-c", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "not valid YAML" in result.stderr


def test_endpoint_pool_affinity_and_routing(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + """\
inference:
  endpoint_routing: round_robin
endpoints:
  - name: gpu1
    url: http://gpu1:8000/v1
    pool: gpu
    affinity: {kind: header, header: x-session-token}
  - name: gpu2
    url: http://gpu2:8000/v1
    affinity: {kind: id_slot, slots: 6}
  - name: plain
    url: http://plain:8000/v1
"""
    )
    config = load_config(write(tmp_path, text), env={})
    gpu1, gpu2, plain = config.endpoints
    assert gpu1.pool == "gpu" and gpu1.affinity.header == "x-session-token"
    assert gpu2.affinity.kind == "id_slot" and gpu2.affinity.slots == 6
    assert plain.affinity.kind == "header" and plain.affinity.header == "x-session-id"
    assert config.inference.endpoint_routing == "round_robin"
    bad = text.replace("kind: id_slot", "kind: cookie")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, bad), env={})
    assert err.value.key == "endpoints[1].affinity.kind"


def test_encryption_needs_a_pickle_key_from_file_or_environment(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "encryption:\n  enabled: true\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert e.value.key == "encryption.pickle_key"
    with pytest.raises(ConfigError):
        load_config(path, env={"HIVEBRIDGE_PICKLE_KEY": "short"})
    config = load_config(path, env={"HIVEBRIDGE_PICKLE_KEY": "a-long-enough-pickle-key"})
    assert config.encryption.enabled and config.encryption.pickle_key
    # The key never shows in a printed config.
    assert "a-long-enough-pickle-key" not in repr(config)


def test_api_section(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), env={})
    assert not config.api.enabled and config.api.hostname == "127.0.0.1"
    text = MINIMAL + """\
api:
  enabled: true
  tokens:
    - {name: notebook, token_env: NB_TOKEN, requests_per_minute: 5}
    - {name: ci, token: "0123456789abcdef-ci"}
"""
    config = load_config(write(tmp_path, text), env={})
    nb, ci = config.api.tokens
    assert nb.resolved({"NB_TOKEN": "from-env-0123456789"}) == "from-env-0123456789"
    assert ci.resolved({}) == "0123456789abcdef-ci" and "0123456789abcdef" not in repr(ci)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL + "api: {enabled: true}\n"), env={})
    assert err.value.key == "api.tokens"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text.replace("0123456789abcdef-ci", "short")), env={})
    assert err.value.key == "api.tokens[1].token"
