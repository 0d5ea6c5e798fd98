"""The endpoint policy: which variables may be keys, which hosts may be called, and
remote model names that can never shadow a local one or another endpoint's."""

from __future__ import annotations

import ipaddress

import pytest

from hivebridge.config import SecurityConfig
from hivebridge.inference.endpoints import EndpointConflict, EndpointPool
from hivebridge.matrix.intake import json_depth
from hivebridge.security import EndpointPolicy, Refused, is_public
from tests.unit.test_router import FakeDeployment

AS_TOKEN = "as-token-0123456789abcdef"
ENV = {
    "HIVEBRIDGE_AS_TOKEN": AS_TOKEN,
    "HIVEBRIDGE_ADMIN_TOKEN": "admin-token-0123456789",
    "HIVEBRIDGE_ENDPOINT_KEY_GPU1": "sk-gpu1-key-0123456789",
    "HIVEBRIDGE_ENDPOINT_KEY_SNEAKY": AS_TOKEN,  # an operator's slip: still never sent
    "OPENAI_KEY": "sk-openai-0123456789",
    "HOME": "/root",
    "EMPTY": "",
}


def policy(**config: object) -> EndpointPolicy:
    return EndpointPolicy(
        SecurityConfig(**config),  # type: ignore[arg-type]
        ["hs-token-0123456789abcdef", "postgres://hb:pw-0123456789@db/hb"],
        ENV,
    )


def test_only_allowed_variables_and_never_a_secret_of_the_bridge() -> None:
    p = policy()
    assert p.resolve_key("env:HIVEBRIDGE_ENDPOINT_KEY_GPU1") == "sk-gpu1-key-0123456789"
    assert p.resolve_key("sk-literal-key") == "sk-literal-key"
    assert p.resolve_key(None) is None
    for name in ("HIVEBRIDGE_AS_TOKEN", "HIVEBRIDGE_ADMIN_TOKEN", "HOME", "OPENAI_KEY"):
        with pytest.raises(Refused, match="not allowed") as refused:
            p.resolve_key(f"env:{name}")
        assert "HIVEBRIDGE_ENDPOINT_KEY_" in str(refused.value)
    with pytest.raises(Refused, match="holds a secret of the bridge") as refused:
        p.resolve_key("env:HIVEBRIDGE_ENDPOINT_KEY_SNEAKY")
    assert AS_TOKEN not in str(refused.value)
    with pytest.raises(Refused, match="not set"):
        p.resolve_key("env:HIVEBRIDGE_ENDPOINT_KEY_NONE")
    # A literal key that is (part of) a secret of the bridge is refused too.
    for secret in (AS_TOKEN, "hs-token-0123456789abcdef", "pw-0123456789"):
        with pytest.raises(Refused, match="secret of the bridge"):
            p.resolve_key(secret)

    explicit = policy(endpoint_key_env_prefix="", endpoint_key_env=("OPENAI_KEY",))
    assert explicit.resolve_key("env:OPENAI_KEY") == "sk-openai-0123456789"
    with pytest.raises(Refused, match="not allowed"):
        explicit.resolve_key("env:HIVEBRIDGE_ENDPOINT_KEY_GPU1")
    # Even listed by name, the bridge's own settings are never keys.
    assert not policy(endpoint_key_env=("HIVEBRIDGE_AS_TOKEN",)).may_name("HIVEBRIDGE_AS_TOKEN")


@pytest.mark.parametrize(
    ("url", "private"),
    [
        ("http://127.0.0.1:8000/v1", True),
        ("http://localhost:8000/v1", True),
        ("http://[::1]:8000/v1", True),
        ("http://169.254.169.254/latest", True),
        ("http://10.1.2.3/v1", True),
        ("http://192.168.0.10/v1", True),
        ("http://100.64.0.1/v1", True),
        ("http://0.0.0.0/v1", True),
        ("http://[::ffff:127.0.0.1]/v1", True),
        ("http://[fe80::1]/v1", True),
        ("http://8.8.8.8/v1", False),
        ("https://[2606:4700:4700::1111]/v1", False),
    ],
)
async def test_private_hosts_are_refused_unless_allowed(url: str, private: bool) -> None:
    p = policy()
    if private:
        with pytest.raises(Refused, match="private address") as refused:
            await p.check_url(url)
        assert "--private" in str(refused.value)
        await p.check_url(url, allow_private=True)  # an owner's explicit word
    else:
        await p.check_url(url)


async def test_the_config_allowlist_names_hosts_and_networks() -> None:
    p = policy(private_endpoint_hosts=("127.0.0.1", "10.0.0.0/8", "gpu.internal"))
    await p.check_url("http://127.0.0.1:9/v1")
    await p.check_url("http://10.9.8.7/v1")
    with pytest.raises(Refused):
        await p.check_url("http://192.168.1.1/v1")
    with pytest.raises(Refused):
        await p.check_url("http://169.254.169.254/")
    assert p.host_allowed("gpu.internal")
    with pytest.raises(Refused, match="does not resolve"):
        await p.check_url("http://no-such-host.invalid/v1")


def test_public_addresses() -> None:
    assert is_public(ipaddress.ip_address("1.1.1.1"))
    assert not is_public(ipaddress.ip_address("224.0.0.1"))
    assert not is_public(ipaddress.ip_address("::ffff:10.0.0.1"))


async def test_remote_names_are_namespaced_and_clashes_refused() -> None:
    pool = EndpointPool()
    evil = FakeDeployment("evil", served=["SmolLM2-135M-Instruct", "x y", "a" * 201, "ok"])
    await pool.add(evil)
    member = pool.member("evil")
    assert member is not None
    # Ids unfit for names are dropped; the rest live under the endpoint's name.
    assert pool.info(member).models == ("evil/SmolLM2-135M-Instruct", "evil/ok")
    assert pool.plan("SmolLM2-135M-Instruct") == []  # a local name: never an endpoint's
    assert pool.plan("evil/SmolLM2-135M-Instruct") == ["evil"]
    assert member.model_id("evil/ok") == "ok" and member.model_id("other/ok") is None

    with pytest.raises(EndpointConflict, match="an endpoint named evil exists"):
        await pool.add(FakeDeployment("evil"))
    # A pool shared by two endpoints; an endpoint may not take the pool's name, and a
    # pool may not take an endpoint's.
    await pool.add(FakeDeployment("gpu1", served=["llama"]), pool="llama")
    await pool.add(FakeDeployment("gpu2", served=["llama"]), pool="llama")
    assert sorted(pool.plan("llama/llama")) == ["gpu1", "gpu2"]
    with pytest.raises(EndpointConflict, match="name of a pool"):
        await pool.add(FakeDeployment("llama", served=["llama"]))
    with pytest.raises(EndpointConflict, match="name of an endpoint"):
        await pool.add(FakeDeployment("gpu3", served=["ok"]), pool="evil")
    await pool.add(FakeDeployment("evil", served=["new"]), replace=True)
    assert pool.info(pool.member("evil")).models == ("evil/new",)  # type: ignore[arg-type]
    await pool.aclose()


def test_json_depth_without_recursion() -> None:
    nested: object = 1
    for _ in range(10_000):
        nested = [nested]
    assert json_depth(nested, 65) == 65
    assert json_depth({"a": [1, {"b": 2}]}, 65) == 3
    assert json_depth("x", 65) == 0
