"""The Grafana dashboard and the alert rules, on a real Prometheus scraping a real bridge.

A real Prometheus (the ``prometheus`` binary, on 127.0.0.1, with a config of
its own) scrapes the bridge while a human holds a short DM exchange with the
default persona through a real Synapse. Then every PromQL expression of every
panel in ``docker/grafana/dashboards/hivebridge.json`` is evaluated through
Prometheus's HTTP API exactly as Grafana would send it, and each must return at
least one series with a finite value: a panel that shows "No data" or NaN after
real traffic is a broken panel. The alert rules in ``docker/prometheus/alerts.yml``
are loaded by the same Prometheus, pass ``promtool check rules``, evaluate
without error, stay quiet while everything is healthy, and fire on their
conditions in ``alerts_test.yml`` (``promtool test rules``).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from ruamel.yaml import YAML

from hivebridge.app import Bridge
from hivebridge.devserver.client import is_edit
from hivebridge.devserver.synapse import free_port
from tests.conftest import skip_or_fail
from tests.e2e.conftest import Homeserver

pytestmark = [pytest.mark.synapse, pytest.mark.model]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker/grafana/dashboards/hivebridge.json"
ALERTS = ROOT / "docker/prometheus/alerts.yml"
ALERT_TESTS = ROOT / "docker/prometheus/alerts_test.yml"
#: The alerts operators were promised; alerts.yml may hold more.
REQUIRED_ALERTS = {
    "HivebridgeDown",
    "HivebridgeTransactionsFailing",
    "HivebridgeReplyErrors",
    "HivebridgeEndpointDown",
    "HivebridgeQueueWaitHigh",
}
#: Scrape and rule evaluation interval: short, so the test waits seconds, not minutes.
INTERVAL_S = 2
#: Grafana's built-in interval variables, as Grafana would expand them at this interval.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": f"{INTERVAL_S}s",
    "$model": ".*",  # the dashboard's model variable, on "All"
}
RFC3339 = re.compile(r"^(?P<date>[^.Z+]+?)(?P<frac>\.\d+)?(?P<zone>Z|[+-]\d\d:\d\d)$")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed (Debian: apt-get install prometheus)")
    assert path is not None
    return path


@dataclass
class Prometheus:
    """A Prometheus server of the test's own; stopped by its PID."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @classmethod
    async def start(cls, workdir: Path, target: str, rules: Path) -> Prometheus:
        prom = cls.spawn(workdir, target, rules)
        try:
            await prom._wait_ready()
        except BaseException:
            prom.stop()
            raise
        return prom

    @classmethod
    def spawn(cls, workdir: Path, target: str, rules: Path) -> Prometheus:
        """Write its config and start it, scraping ``target`` as the job "hivebridge"."""
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {
                "scrape_interval": f"{INTERVAL_S}s",
                "scrape_timeout": f"{INTERVAL_S}s",
                "evaluation_interval": f"{INTERVAL_S}s",
            },
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": "hivebridge",  # the job name alerts.yml expects
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        config_path = workdir / "prometheus.yml"
        with open(config_path, "w") as fh:
            YAML().dump(config, fh)
        port = free_port()
        log_path = workdir / "prometheus.log"
        with open(log_path, "ab") as out:
            process = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                cwd=workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return cls(process, f"http://127.0.0.1:{port}", log_path)

    async def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"prometheus exited:\n{self.log_tail()}")
                try:
                    async with http.get(f"{self.url}/-/ready") as resp:
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, OSError):
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError(f"prometheus not ready:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def api(self, path: str, **params: str) -> Any:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.url}/api/v1/{path}", params=params or None) as resp,
        ):
            body = await resp.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    async def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query now: (labels, value) per series; a scalar is one unlabelled row."""
        data = await self.api("query", query=expr)
        if data["resultType"] == "vector":
            return [(r["metric"], float(r["value"][1])) for r in data["result"]]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        raise AssertionError(f"unexpected result type {data['resultType']} for {expr}")

    async def last_scrape(self) -> float:
        """When the bridge was last scraped (its ``up`` sample's timestamp), 0 if never."""
        rows = await self.query('timestamp(up{job="hivebridge"})')
        return rows[0][1] if rows else 0.0

    async def scraped_after(self, when: float, timeout: float = 30.0) -> None:
        """Wait until a scrape that began after ``when`` (unix time) is stored."""
        deadline = time.monotonic() + timeout
        while await self.last_scrape() <= when:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no scrape after {when}:\n{self.log_tail()}")
            await asyncio.sleep(0.25)
        # Up and healthy, not a failed attempt.
        assert [v for _, v in await self.query('up{job="hivebridge"}')] == [1.0]


@pytest.fixture
def promtool() -> str:
    return tool("promtool")


@pytest.fixture
async def prometheus(bridge: Bridge, tmp_path: Path) -> AsyncIterator[Prometheus]:
    """Prometheus scraping the ``bridge`` fixture's metrics listener, with alerts.yml loaded."""
    metrics = bridge.config.metrics
    assert metrics.enabled
    prom = await Prometheus.start(tmp_path / "prometheus", f"127.0.0.1:{metrics.port}", ALERTS)
    try:
        yield prom
    finally:
        prom.stop()


def dashboard_targets() -> Iterator[tuple[str, str, str]]:
    """(panel title, refId, PromQL) for every query of every panel, rows included."""
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))

    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    for panel in walk(data["panels"]):
        for target in panel.get("targets", []):
            expr = str(target["expr"])
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr!r}"
            yield f"{panel['id']} {panel['title']}", str(target.get("refId", "?")), expr


async def exchange(homeserver: Homeserver, bridge: Bridge, prom: Prometheus) -> None:
    """Two DM turns with the default persona, each one followed by a stored scrape.

    The first turn creates the per-persona and per-model series; the second moves
    them between two scrapes, so rate() and histogram_quantile() have something
    to say (Prometheus does not count a series' first appearance as an increase).
    """
    persona = bridge.config.persona_mxid(bridge.config.default_persona.name)
    async with await homeserver.human("dash") as human:
        room = await human.create_room([persona], direct=True)
        await human.wait_for_members(room, {human.user_id, persona})
        seen: set[str] = set()
        for text in ("Hello! Say something short.", "And one more short thing?"):
            await human.send_text(room, text)
            reply = await human.wait_for(
                room,
                lambda e: (
                    e.get("sender") == persona
                    and e.get("type") == "m.room.message"
                    and not is_edit(e)
                    and e["event_id"] not in seen
                ),
                timeout=120,
            )
            seen.add(reply["event_id"])
            assert not reply["content"]["body"].startswith("⚠️"), reply["content"]["body"]
            await bridge.parts.handler.drain()
            await prom.scraped_after(time.time())


def describe(rows: list[tuple[dict[str, str], float]]) -> str:
    if not rows:
        return "no series"
    shown = ", ".join(
        f"{','.join(f'{k}={v}' for k, v in sorted(labels.items())) or '{}'}={value:.4g}"
        for labels, value in rows[:4]
    )
    return f"{len(rows)} series: {shown}" + (" ..." if len(rows) > 4 else "")


async def test_every_dashboard_panel_returns_data_after_a_real_exchange(
    homeserver: Homeserver, bridge: Bridge, prometheus: Prometheus
) -> None:
    await prometheus.scraped_after(0)  # scraped before the exchange: counters start at 0
    await exchange(homeserver, bridge, prometheus)

    report: list[str] = []
    missing: list[str] = []
    for panel, ref, expr in dashboard_targets():
        rows = await prometheus.query(expr)
        finite = [v for _, v in rows if math.isfinite(v)]
        ok = bool(finite)
        report.append(f"{'data   ' if ok else 'NO DATA'} | {panel} [{ref}] | {describe(rows)}")
        if not ok:
            missing.append(f"{panel} [{ref}]: {expr} -> {describe(rows)}")
    print("\n" + "\n".join(report))  # the panel list, for the record (pytest -s)
    assert not missing, "panels without data:\n" + "\n".join(missing)

    # The figures the exchange must have moved, read as the dashboard reads them.
    async def value(expr: str) -> float:
        rows = await prometheus.query(expr)
        assert rows, expr
        return sum(v for _, v in rows)

    assert await value("sum(rate(hivebridge_matrix_replies_sent_total[5m])) * 60") > 0
    assert await value("sum(rate(hivebridge_inference_completion_tokens_total[5m])) > 0") > 0
    assert await value("sum(hivebridge_model_loaded)") >= 1
    assert await value('sum(rate(hivebridge_matrix_transactions_total{outcome="new"}[5m]))') > 0


def test_alert_rules_pass_promtool(promtool: str) -> None:
    """Valid rules (check), and each alert fires on its condition, not its neighbour's (test)."""
    check = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    tests = subprocess.run(
        [promtool, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, timeout=60
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert alerts_in_file() >= REQUIRED_ALERTS


def alerts_in_file() -> set[str]:
    with open(ALERTS) as fh:
        return {r["alert"] for g in YAML().load(fh)["groups"] for r in g["rules"]}


async def test_alert_rules_load_evaluate_and_stay_quiet_when_healthy(
    homeserver: Homeserver, bridge: Bridge, prometheus: Prometheus
) -> None:
    await prometheus.scraped_after(0)
    await exchange(homeserver, bridge, prometheus)

    # Every rule has been evaluated since the exchange, without error.
    since = time.time()
    deadline = time.monotonic() + 30
    while True:
        groups = (await prometheus.api("rules"))["groups"]
        rules = [r for g in groups for r in g["rules"]]
        evaluated = [r for r in rules if _evaluated_after(r, since)]
        if rules and len(evaluated) == len(rules):
            break
        assert time.monotonic() < deadline, f"rules not evaluated: {rules}"
        await asyncio.sleep(0.5)
    assert [g["file"] for g in groups] == [str(ALERTS)]
    names = {r["name"] for r in rules if r["type"] == "alerting"}
    assert names >= REQUIRED_ALERTS, REQUIRED_ALERTS - names
    assert names == alerts_in_file()
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        assert not rule.get("lastError"), rule
    # A healthy bridge after a good exchange: nothing pending, nothing firing.
    alerts = (await prometheus.api("alerts"))["alerts"]
    assert alerts == [], alerts


def _evaluated_after(rule: dict[str, Any], since: float) -> bool:
    """Whether the rule's last evaluation (RFC 3339 with nanoseconds) is later than ``since``."""
    match = RFC3339.match(str(rule.get("lastEvaluation", "")))
    if match is None or match["date"].startswith("0001-"):
        return False  # never evaluated yet
    zone = "+00:00" if match["zone"] == "Z" else match["zone"]
    when = datetime.fromisoformat(match["date"] + zone).timestamp()
    return when + float("0" + (match["frac"] or ".0")) > since
