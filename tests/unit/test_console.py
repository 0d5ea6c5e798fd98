"""The console finds the admin API from flags, the environment or the config file."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from hivebridge.cli import build_parser
from hivebridge.console import EXIT_USAGE, ConsoleError, run, target

CONFIG = """\
homeserver:
  address: http://127.0.0.1:8008
  domain: example.org
admin_api:
  hostname: "{host}"
  port: 29444
  token: {token}
"""


def args(tmp_path: Path, *argv: str, host: str = "127.0.0.1", token: str = "from-config"):  # type: ignore[no-untyped-def]
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(host=host, token=token))
    return build_parser().parse_args(["-c", str(path), *argv])


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:29444"),
        ("0.0.0.0", "http://127.0.0.1:29444"),
        ("::", "http://127.0.0.1:29444"),
        ("::1", "http://[::1]:29444"),
        ("admin.internal", "http://admin.internal:29444"),
    ],
)
def test_address_from_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str, url: str
) -> None:
    monkeypatch.delenv("HIVEBRIDGE_ADMIN_TOKEN", raising=False)
    assert target(args(tmp_path, "stats", host=host)) == (url, "from-config")


def test_flags_then_environment_then_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HIVEBRIDGE_ADMIN_TOKEN", "from-env")
    assert target(args(tmp_path, "stats"))[1] == "from-env"
    assert target(args(tmp_path, "stats", "--token", "flag", "--url", "http://h:1/")) == (
        "http://h:1",
        "flag",
    )


def test_no_token_is_bad_usage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIVEBRIDGE_ADMIN_TOKEN", raising=False)
    with pytest.raises(ConsoleError) as e:
        target(args(tmp_path, "stats", token="''"))
    assert e.value.status == EXIT_USAGE and "admin_api.token is not set" in str(e.value)
    err = io.StringIO()
    assert run(args(tmp_path, "rooms", "list", token="''"), err=err) == EXIT_USAGE
    assert err.getvalue().startswith("hivebridge: admin_api.token is not set")


def test_unreachable_bridge_is_one_line(tmp_path: Path) -> None:
    err = io.StringIO()
    code = run(
        args(tmp_path, "stats", "--url", "http://127.0.0.1:9", "--token", "secret-token-1"),
        err=err,
    )
    assert code == 1
    assert err.getvalue().startswith("hivebridge: cannot reach the admin API at http://127.0.0.1:9")
    assert "secret-token-1" not in err.getvalue() and err.getvalue().count("\n") == 1
