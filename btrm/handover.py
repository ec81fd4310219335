"""What the launcher hands the ranks through the environment: the token budget it planned, so they need not plan again."""

from __future__ import annotations

import os

PLANNED_BUDGET_ENV = "BTRM_PLANNED_TOKEN_BUDGET"  # "tokens|source"


def encode_budget(budget) -> str:
    """A batching.TokenBudget as PLANNED_BUDGET_ENV's value."""
    return f"{budget.tokens}|{budget.source}"


def planned_budget_from_environment():
    """The batching.TokenBudget the launcher planned for this launch, or None."""
    from btrm.batching import TokenBudget

    handed_over = os.environ.get(PLANNED_BUDGET_ENV)
    if not handed_over:
        return None
    tokens, source = handed_over.split("|", 1)
    return TokenBudget(int(tokens), source)
