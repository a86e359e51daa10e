"""The alert tests' webhook receiver and gateway (tests/alerts), for owners' budgets."""

from tests.alerts.conftest import gw, receiver

__all__ = ["gw", "receiver"]
