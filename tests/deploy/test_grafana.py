"""The Grafana dashboard (deploy/grafana/budgetgate.json) is built on the metrics the gateway
serves: every expression names only metrics (and labels) that app/metrics.py defines."""

from __future__ import annotations

import json
import re
from pathlib import Path

from app import metrics

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "budgetgate.json"
# The families /metrics serves, with the series suffixes Prometheus adds.
SERVED = {
    "budgetgate_requests_total": {"route", "model", "status", "outcome"},
    "budgetgate_spend_dollars_total": {"model"},
    "budgetgate_rejections_total": {"scope"},
    "budgetgate_overruns_total": set(),
    "budgetgate_upstream_seconds_bucket": {"route", "le"},
    "budgetgate_ledger_seconds_bucket": {"step", "le"},
    "budgetgate_reservations_open": set(),
    "budgetgate_budget_remaining_dollars": {
        "scope",
        "owner_id",
        "owner_name",
        "key_id",
        "alias",
        "window",
    },
    "budgetgate_budget_spend_dollars": {
        "scope",
        "owner_id",
        "owner_name",
        "key_id",
        "alias",
        "window",
    },
}


def test_served_names_are_the_metrics_module_s() -> None:
    defined = {
        m._name  # noqa: SLF001 -- prometheus-client keeps the base name here
        for m in vars(metrics).values()
        if hasattr(m, "_name") and hasattr(m, "_labelnames")
    }
    for name in SERVED:
        base = re.sub(r"_(total|bucket)$", "", name)
        assert base in defined or name.startswith("budgetgate_budget_"), name


def test_every_panel_queries_served_metrics_and_labels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "budgetgate" and dashboard["panels"]
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            names = set(re.findall(r"budgetgate_\w+", expr))
            assert names, (panel["title"], expr)
            for name in names:
                assert name in SERVED, (panel["title"], name)
                used.add(name)
                labels = set(re.findall(r"by \(([^)]*)\)", expr))
                for group in labels:
                    for label in (x.strip() for x in group.split(",")):
                        assert label in SERVED[name], (panel["title"], label)
    assert used >= {
        "budgetgate_requests_total",
        "budgetgate_spend_dollars_total",
        "budgetgate_rejections_total",
        "budgetgate_overruns_total",
        "budgetgate_upstream_seconds_bucket",
        "budgetgate_ledger_seconds_bucket",
        "budgetgate_reservations_open",
    }
