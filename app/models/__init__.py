from app.models.api_key import ApiKey
from app.models.base import Base
from app.models.budget import Budget
from app.models.budget_alert import BudgetAlert
from app.models.budget_period import BudgetPeriod
from app.models.ledger_entry import LedgerCharge, LedgerEntry
from app.models.owner import Owner
from app.models.reservation import Reservation

__all__ = [
    "ApiKey",
    "Base",
    "Budget",
    "BudgetAlert",
    "BudgetPeriod",
    "LedgerCharge",
    "LedgerEntry",
    "Owner",
    "Reservation",
]
