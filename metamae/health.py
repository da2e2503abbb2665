"""Health signals of a pretraining run: the signs that a configuration is not learning what it should.

    support_rises   the inner step raises the support loss on average (ℓ_s(z*) > ℓ_s(z) over the run
                    so far): the adaptation step hurts the task it adapts to; α is likely too large,
                    or the inputs are not standardised
    collapsed       the encoder's features barely differ between examples (feature spread under
                    COLLAPSE_SPREAD, see linear_eval.feature_spread): a collapsed representation

Each report carries `support_change` (the mean of ℓ_s(z*) - ℓ_s(z) since the run (re)started),
`feature_spread` at the online probe, and the flags as 0/1 numbers, which Tune's stopping rules and
the sweep report read. A NaN or infinite loss is the third sign: it stops the run
(train.NonFiniteLoss), and the sweep report flags the trial from its error.
"""
from __future__ import annotations

import math
from typing import Optional

COLLAPSE_SPREAD = 1e-3
FLAGS = ("support_rises", "collapsed")


class Health:
    """The run's running signals; `read()` gives the numbers each report carries."""

    def __init__(self):
        self.change_sum, self.steps = 0.0, 0
        self.spread: Optional[float] = None
        self.raised: set[str] = set()

    def step(self, scalars: dict[str, float]) -> None:
        """One training step's loss terms (MetaMAE's carry support_before and support_after)."""
        if "support_after" in scalars and "support_before" in scalars:
            change = scalars["support_after"] - scalars["support_before"]
            if math.isfinite(change):
                self.change_sum += change
                self.steps += 1

    def probed(self, spread: float) -> None:
        self.spread = spread

    def read(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.steps:
            metrics["support_change"] = self.change_sum / self.steps
            metrics["support_rises"] = float(metrics["support_change"] > 0)
        if self.spread is not None:
            metrics["feature_spread"] = self.spread
            metrics["collapsed"] = float(self.spread < COLLAPSE_SPREAD)
        return metrics

    def new_warnings(self, step: int) -> list[str]:
        """One line for each flag that is up for the first time in this run."""
        metrics, lines = self.read(), []
        for flag in FLAGS:
            if metrics.get(flag) and flag not in self.raised:
                self.raised.add(flag)
                lines.append(f"step {step}: {describe(flag, metrics)}")
        return lines


def describe(flag: str, metrics: dict[str, float]) -> str:
    """A flag in plain words, with its number."""
    if flag == "support_rises":
        return (f"the inner step raises the support loss on average (ℓ_s(z*) - ℓ_s(z) = "
                f"{metrics['support_change']:+.4g}): lower objective.inner_lr, or standardise the inputs")
    if flag == "collapsed":
        return (f"the encoder's features barely differ between examples (feature spread "
                f"{metrics['feature_spread']:.3g} < {COLLAPSE_SPREAD}): a collapsed representation")
    raise KeyError(flag)


def unhealthy(report: dict) -> list[str]:
    """The flags a report has up."""
    return [flag for flag in FLAGS if report.get(flag)]
