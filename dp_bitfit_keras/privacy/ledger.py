"""The privacy ledger: a sequence of segments, each a run of identical DP-SGD steps.

A segment is (σ of the sum, σ of adaptive clipping's count or 0, sampling rate q, steps). A
training run appends one; a later `fit` at another batch size, or a later phase at another σ,
appends another, and ε is `dp_accounting`'s over the composition of every segment's event
(RDP or PLD): no accounting math lives here, only the events.

The optimizer keeps the closed segments in a fixed-size table variable (so Keras saves and
restores them with its other variables) and the open one in its σ, q and step counters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import dp_accounting
import numpy as np
from dp_accounting import rdp

from dp_bitfit_keras.privacy import accounting

# Rows of the optimizer's segment table: more than any training script changes its settings.
MAX_SEGMENTS = 64
COLUMNS = 4  # noise_multiplier, count_noise_multiplier, sampling_rate, steps


@dataclasses.dataclass(frozen=True)
class Segment:
    """`steps` Poisson-subsampled Gaussian steps at one (σ, q).

    Args:
        noise_multiplier: σ of the clipped sum's Gaussian (noise std / clip).
        sampling_rate: q, the probability that a unit (example or user) is in a step's batch.
        steps: how many such steps were taken.
        count_noise_multiplier: with adaptive clipping, the σ of the count query's Gaussian
            (its event is composed with the sum's in every step); 0 without it.
    """

    noise_multiplier: float
    sampling_rate: float
    steps: int
    count_noise_multiplier: float = 0.0

    def __post_init__(self):
        accounting.validate(self.noise_multiplier, self.sampling_rate, self.steps)
        if not self.count_noise_multiplier >= 0:
            raise ValueError(f"count_noise_multiplier must be >= 0; got {self.count_noise_multiplier}.")

    def step_event(self) -> dp_accounting.DpEvent:
        """The event of one step before subsampling."""
        if self.count_noise_multiplier == 0:
            return dp_accounting.GaussianDpEvent(self.noise_multiplier)
        return dp_accounting.ComposedDpEvent(
            [
                dp_accounting.GaussianDpEvent(self.noise_multiplier),
                dp_accounting.GaussianDpEvent(self.count_noise_multiplier),
            ]
        )

    def event(self) -> dp_accounting.DpEvent:
        return accounting.dp_sgd_event_of(self.step_event(), self.sampling_rate, self.steps)

    def same_mechanism(self, other: Segment) -> bool:
        return all(
            math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
            for a, b in (
                (self.noise_multiplier, other.noise_multiplier),
                (self.sampling_rate, other.sampling_rate),
                (self.count_noise_multiplier, other.count_noise_multiplier),
            )
        )

    def row(self) -> list[float]:
        return [self.noise_multiplier, self.count_noise_multiplier, self.sampling_rate, float(self.steps)]

    @classmethod
    def from_row(cls, row) -> Segment:
        sigma, count, q, steps = (float(v) for v in row)
        return cls(sigma, q, int(round(steps)), count)


def event_of(segments: Sequence[Segment]) -> dp_accounting.DpEvent:
    """The composed `DpEvent` of the segments (steps-0 segments leave it unchanged)."""
    events = [s.event() for s in segments if s.steps > 0]
    return dp_accounting.ComposedDpEvent(events)


def epsilon(segments: Sequence[Segment], delta: float, accountant: str = "rdp") -> float:
    """ε of all the segments composed, at `delta`: 0 without steps, ∞ if any step had σ = 0.

    Example:
        >>> first = [Segment(1.1, 0.01, 300)]
        >>> both = first + [Segment(0.9, 0.05, 40)]
        >>> 0 < epsilon(first, 1e-5) < epsilon(both, 1e-5)
        True
    """
    taken = [s for s in segments if s.steps > 0]
    if not taken:
        return 0.0
    if any(s.noise_multiplier == 0 for s in taken):
        return math.inf
    return accounting.epsilon_of_event(event_of(taken), delta, accountant)


def to_table(segments: Sequence[Segment]) -> np.ndarray:
    """The optimizer's `[MAX_SEGMENTS, 4]` table of closed segments (unused rows are zero)."""
    if len(segments) > MAX_SEGMENTS:
        raise ValueError(
            f"The ledger holds at most {MAX_SEGMENTS} segments (changes of σ, sampling rate or "
            f"clipping); this one would need {len(segments)}."
        )
    table = np.zeros((MAX_SEGMENTS, COLUMNS), np.float64)
    for i, s in enumerate(segments):
        table[i] = s.row()
    return table


def from_table(table, size: int) -> list[Segment]:
    return [Segment.from_row(row) for row in np.asarray(table)[: int(size)]]


class EpsilonCurve:
    """ε after a total of `steps` steps: the closed segments, then the open segment's steps.

    The open segment began at step `first_step` (the closed segments' steps). With RDP,
    composition adds: the closed segments' RDP vector and one open step's are computed once, and
    ε(steps) is the conversion of `closed + (steps - first_step)·step` (the figure `epsilon`
    gives for the same segments, microseconds instead of tens of milliseconds); values are
    cached. PLD has no such shortcut: each new count composes afresh (slow; a progress bar
    should not ask every step).
    """

    def __init__(
        self,
        closed: Sequence[Segment],
        open_segment: Segment,
        delta: float,
        accountant: str = "rdp",
        first_step: int = 0,
    ):
        accounting.validate(delta=delta, accountant=accountant)
        self.closed = [s for s in closed if s.steps > 0]
        self.open_segment = open_segment
        self.first_step = int(first_step)
        self.delta, self.accountant = delta, accountant
        self._cache: dict[int, float] = {}
        self._orders = None
        if accountant == "rdp" and not any(s.noise_multiplier == 0 for s in [*self.closed, open_segment]):
            closed_acc, step_acc = rdp.RdpAccountant(), rdp.RdpAccountant()
            closed_acc.compose(event_of(self.closed))
            step_acc.compose(dataclasses.replace(open_segment, steps=1).event())
            try:
                self._orders = list(step_acc._orders)
                self._closed_rdp = np.asarray(closed_acc._rdp, np.float64)
                self._step_rdp = np.asarray(step_acc._rdp, np.float64)
            except AttributeError:  # another dp_accounting layout: compose afresh (slow, exact)
                self._orders = None

    def __call__(self, steps: int) -> float:
        opened = max(int(steps) - self.first_step, 0)
        if opened not in self._cache:
            if self._orders is not None and (self.closed or opened > 0):
                from dp_accounting.rdp import rdp_privacy_accountant

                eps, _ = rdp_privacy_accountant.compute_epsilon(
                    self._orders, list(self._closed_rdp + opened * self._step_rdp), self.delta
                )
                self._cache[opened] = float(eps)
            else:
                segments = [*self.closed, dataclasses.replace(self.open_segment, steps=opened)]
                self._cache[opened] = epsilon(segments, self.delta, self.accountant)
        return self._cache[opened]

    def max_steps_within(self, budget: float) -> int:
        """The largest total step count whose ε stays ≤ `budget` (ε grows with the steps).

        `first_step` when the closed segments alone spend the budget or one more step would
        exceed it.
        """
        first = self.first_step
        if not self(first + 1) <= budget:
            return first
        low, high = 1, 2
        while self(first + high) <= budget:
            low, high = high, high * 2
            if high > 1 << 40:
                return first + high
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self(first + mid) <= budget else (low, mid)
        return first + low
