"""The Grafana dashboard only queries metrics the bridge exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hivebridge.metrics import REGISTRY

DASHBOARD = Path(__file__).resolve().parents[2] / "docker/grafana/dashboards/hivebridge.json"
METRIC_RE = re.compile(r"hivebridge_[a-z0-9_]+")
#: Series suffixes that belong to a family (histograms; counters are exported with _total).
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _exported() -> dict[str, str]:
    """Family name -> type, for every family in the bridge's registry."""
    return {f.name: f.type for f in REGISTRY.collect()}


def family_of(series: str, families: dict[str, str]) -> str | None:
    """The family a series name belongs to, honouring the suffixes its type allows."""
    if families.get(series) == "gauge":
        return series
    for suffix in SUFFIXES:
        base = series.removesuffix(suffix)
        if base == series or base not in families:
            continue
        kind = families[base]
        if kind == "counter" and suffix in ("_total", "_created"):
            return base
        if kind == "histogram" and suffix in ("_bucket", "_sum", "_count", "_created"):
            return base
    return None


def test_dashboard_has_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "hivebridge"
    assert dashboard["title"]


def test_dashboard_has_panels_with_targets(dashboard: dict[str, Any]) -> None:
    panels = [p for p in _panels(dashboard["panels"]) if p.get("type") != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel.get("targets"), panel.get("title")
        assert panel.get("gridPos"), panel.get("title")
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))


def test_every_expr_names_exported_metrics(dashboard: dict[str, Any]) -> None:
    families = _exported()
    seen: set[str] = set()
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            names = METRIC_RE.findall(target["expr"])
            assert names, f"{panel['title']}: no hivebridge metric in {target['expr']!r}"
            for name in names:
                family = family_of(name, families)
                assert family is not None, f"{panel['title']}: {name} is not exported"
                seen.add(family)
    # The dashboard shows every family at least once.
    assert seen == set(families)


def test_family_of() -> None:
    families = {"hivebridge_a": "counter", "hivebridge_h": "histogram", "hivebridge_g": "gauge"}
    assert family_of("hivebridge_a_total", families) == "hivebridge_a"
    assert family_of("hivebridge_a", families) is None  # counters are exported with _total
    assert family_of("hivebridge_h_bucket", families) == "hivebridge_h"
    assert family_of("hivebridge_h", families) is None
    assert family_of("hivebridge_g", families) == "hivebridge_g"
    assert family_of("hivebridge_g_total", families) is None
    assert family_of("hivebridge_nope_total", families) is None
