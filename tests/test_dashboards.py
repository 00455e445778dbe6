"""The committed Grafana dashboards are exactly what dashboards/generate.py builds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import yaml

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "generate", DASHBOARDS / "generate.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_dashboards_match_the_code() -> None:
    """Regenerate with `python dashboards/generate.py` when this fails."""
    built: dict[str, str] = _generator().render()
    committed = {
        path.name: path.read_text() for path in (DASHBOARDS / "grafana").glob("*.json")
    }
    assert sorted(committed) == sorted(built)
    for name, text in built.items():
        assert committed[name] == text, f"{name} is stale"


def test_every_panel_queries_the_provisioned_datasource() -> None:
    """Each panel has PromQL, and the datasource uid is the provisioned one."""
    provisioned = yaml.safe_load(
        (DASHBOARDS / "provisioning" / "datasources" / "callgate.yml").read_text()
    )
    uid = provisioned["datasources"][0]["uid"]
    for path in (DASHBOARDS / "grafana").glob("*.json"):
        document = json.loads(path.read_text())
        assert document["panels"], path.name
        for panel in document["panels"]:
            assert panel["datasource"]["uid"] == uid
            assert panel["targets"]
            assert all(target["expr"].strip() for target in panel["targets"])
