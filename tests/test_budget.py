"""The serving engine's prefill token budget (stablelm.serving.budget)."""

from __future__ import annotations

import pytest

from stablelm.serving.budget import PrefillBudget


def test_auto_budget_fits_fixed_and_per_token_costs():
    """Rounds cost 0.1 s of decode, 0.02 s fixed and 0.01 s a prompt token: the fit recovers both, and the
    budget keeps a round within 1.8 decode rounds ((0.8 * 0.1 - 0.02) / 0.01 = 6 tokens)."""
    budget = PrefillBudget("auto", max_gap=1.8)
    assert budget.tokens(decoding=False) == PrefillBudget.LIMIT  # nothing to stall
    budget.observe(0.1, decode_rows=4, prompt_tokens=0)
    assert budget.tokens(decoding=True) == PrefillBudget.FIRST  # not timed yet
    for tokens in (8, 4, 6, 3, 8):
        budget.observe(0.1 + 0.02 + 0.01 * tokens, decode_rows=4, prompt_tokens=tokens)
    fixed, per_token = budget.fit()
    assert fixed == pytest.approx(0.02) and per_token == pytest.approx(0.01)
    assert sorted(budget.tokens(decoding=True) for _ in range(2)) == [4, 6]  # every other round a quarter less
    budget.observe(0.2, decode_rows=0, prompt_tokens=16)  # prompt-only rounds say nothing about the stall
    assert len(budget.samples) == 5


def test_fixed_budgets_and_bad_values():
    assert PrefillBudget(32).tokens(decoding=True) == 32
    assert PrefillBudget(None).tokens(decoding=True) is None
    for chunk in (0, -3, 2.5, "fast", True):
        with pytest.raises(ValueError, match="prefill_chunk"):
            PrefillBudget(chunk)
    with pytest.raises(ValueError, match="max_gap"):
        PrefillBudget("auto", max_gap=1.0)
