"""What the alert rules and the Grafana dashboard (deploy/) may query: the metrics catalog's
series (cni/helper/catalog.py), the recording rules the rules file defines, and Prometheus's
own `up`. Shared by the unit tests of both (tests/unit/deploy/) and the real-Prometheus test,
which also has Prometheus itself parse every expression."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from ipam_da_consul.cni.helper import catalog

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "ipam-da-consul.rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "ipam-da-consul.rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "ipam-da-consul.json"
# Series Prometheus makes itself for every target.
PROMETHEUS_OWN = {"up"}

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBER = re.compile(r"(?<![\w:])(?:\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?)+(?![\w:])")
_WORD = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "bool", "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: every word that is not a function, keyword,
    label (in matchers or grouping), string, number or duration."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for found in _WORD.finditer(text):
        word = found.group(0)
        if text[found.end():].lstrip().startswith("(") or word.lower() in _KEYWORDS:
            continue  # a function or an aggregation, or a keyword
        names.add(word)
    return names


# libyaml's parser where there is one: the rules' test file takes the pure-Python one a second.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=LOADER)


def rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(RULES)["groups"] for r in g["rules"]]


def recorded() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def known_series() -> set[str]:
    """What a rule or a panel may select."""
    return catalog.series_names() | recorded() | PROMETHEUS_OWN


def grafana_substitute(expr: str) -> str:
    """A dashboard expression as Prometheus would get it: Grafana's interval variables and the
    dashboard's own (`$pool`, `${consul}`...) replaced by what they could stand for."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    expr = re.sub(r"\$\{?__range_s\}?", "300", expr)
    return re.sub(r"\$\{?(\w+)(?::\w+)?\}?", ".*", expr)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expression) of every query in the dashboard: panels' targets and templating
    variables' queries."""
    out = []
    for panel in _panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((f"panel {panel.get('title')!r}", target["expr"]))
    for var in dashboard().get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        if var.get("type") == "query" and text:
            found = re.fullmatch(r"label_values\((.*),\s*\w+\)", text.strip())
            out.append((f"variable {var['name']!r}", found.group(1) if found else text))
    return out


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in panels:
        out.append(p)
        out += _panels(p.get("panels", []))  # a collapsed row holds its panels
    return out
