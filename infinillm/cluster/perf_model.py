"""StepTimeModel: how long one instance's step takes, as a function of what it runs, fitted
online from the instance's own step records.

The paper's shape (Infinite-LLM v2): a step's time is a term for the layers' weights, which
depends on the batch (a small batch pays for reading every weight and uses the device badly; a
large one is compute bound), plus a term for attention, which depends on the KV tokens read:

    T = W(n) + S / g + P * p + H * h

- n: tokens the step runs (one per decoding request, a chunk's length for a prefill);
  W(n) is piecewise linear between knots at powers of two (the paper's W(b)/f(b));
- S: KV tokens read by decoding requests; g is the attention's rate in tokens/s;
- P: query-key pairs of prefill chunks (causal within the chunk, the whole prefix visible);
- H: remote holders asked per step (a request whose blocks live on k other instances asks k):
  the DistAttention exchange, per step.

The coefficients come from non-negative least squares over a window of the latest steps, refit
every `refit_every` records. Before the first fit (fewer than `min_records`) `predict` returns
None and callers decide without the model. The fit is cheap (a few dozen columns, a window of
hundreds of rows) and runs outside the step's hot path only when enough new records came.

Plain Python over numbers, with numpy for the fit; no tensors, no engine state.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from infinillm.types import InstanceId, ScheduledChunk

KNOTS = tuple(2 ** k for k in range(20))  # 1 .. 512K tokens a step


@dataclass(frozen=True, slots=True)
class StepFeatures:
    """What one instance ran in a step, as the model sees it."""

    num_tokens: int = 0
    kv_read: int = 0  # S
    prefill_pairs: float = 0.0  # P
    remote_holders: int = 0  # H

    @classmethod
    def of(cls, instance_id: InstanceId, chunks: Iterable[ScheduledChunk]) -> StepFeatures:
        n = s = h = 0
        pairs = 0.0
        for c in chunks:
            num = len(c.token_ids)
            n += num
            if num == 1:
                s += c.start_pos + 1
            else:
                pairs += num * (c.start_pos + (num + 1) / 2)
            h += len(c.holders) - (instance_id in c.holders)
        return cls(n, s, pairs, h)

    def plus(self, num_tokens: int = 0, kv_read: int = 0, remote_holders: int = 0
             ) -> StepFeatures:
        return StepFeatures(self.num_tokens + num_tokens, max(0, self.kv_read + kv_read),
                            self.prefill_pairs, max(0, self.remote_holders + remote_holders))


class StepTimeModel:
    def __init__(self, window: int = 512, refit_every: int = 32, min_records: int = 16) -> None:
        self._records: deque[tuple[StepFeatures, float]] = deque(maxlen=window)
        self.refit_every = refit_every
        self.min_records = min_records
        self._since_fit = 0
        self._knots: tuple[int, ...] = ()
        self._w: list[float] = []  # W at each knot
        self.sec_per_kv_token = 0.0  # 1 / g
        self.sec_per_prefill_pair = 0.0  # p
        self.sec_per_remote_holder = 0.0  # h
        self.num_records = 0

    @property
    def fitted(self) -> bool:
        return bool(self._knots)

    def observe(self, features: StepFeatures, seconds: float) -> None:
        """Record a step that ran `features` in `seconds`; refit when enough new ones came."""
        if features.num_tokens <= 0 or not seconds > 0:
            return
        self._records.append((features, seconds))
        self.num_records += 1
        self._since_fit += 1
        if self._since_fit >= (self.refit_every if self.fitted else self.min_records):
            self.fit()

    def fit(self) -> None:
        """Refit on the window (non-negative coefficients; knots only where steps were seen)."""
        self._since_fit = 0
        if len(self._records) < self.min_records:
            return
        # a knot where steps were seen (the power of two at or below each n), and one past
        # the largest: every knot's hat then covers some step and its column is not empty
        seen = {f.num_tokens for f, _ in self._records}
        knots = sorted({max(k for k in KNOTS if k <= n) for n in seen})
        if max(seen) > knots[-1]:
            knots.append(min((k for k in KNOTS if k >= max(seen)), default=max(seen)))
        knots = tuple(knots)
        rows = [self._row(knots, f) for f, _ in self._records]
        coef = nonneg_lstsq(rows, [s for _, s in self._records])
        self._knots = knots
        self._w = coef[:len(knots)]
        self.sec_per_kv_token, self.sec_per_prefill_pair, self.sec_per_remote_holder = (
            coef[len(knots):])

    def predict(self, features: StepFeatures) -> float | None:
        """Modelled seconds of a step running `features`; None before the first fit."""
        if not self.fitted:
            return None
        return (self.weights_seconds(features.num_tokens)
                + features.kv_read * self.sec_per_kv_token
                + features.prefill_pairs * self.sec_per_prefill_pair
                + features.remote_holders * self.sec_per_remote_holder)

    def weights_seconds(self, num_tokens: int) -> float:
        """W(n): linear between the fitted knots, extended along the last segment beyond them
        and flat below the first."""
        knots, w = self._knots, self._w
        if len(knots) == 1 or num_tokens <= knots[0]:
            return w[0] if num_tokens <= knots[0] else w[0] * num_tokens / knots[0]
        i = min(bisect.bisect_right(knots, num_tokens), len(knots) - 1)
        x0, x1, y0, y1 = knots[i - 1], knots[i], w[i - 1], w[i]
        return y0 + (y1 - y0) * (num_tokens - x0) / (x1 - x0)

    def _row(self, knots: tuple[int, ...], f: StepFeatures) -> list[float]:
        """Hat-function weights of n over the knots (W is their combination), then S, P, H."""
        hats = [0.0] * len(knots)
        n = f.num_tokens
        if n <= knots[0] or len(knots) == 1:
            hats[0] = 1.0 if n <= knots[0] else n / knots[0]
        else:
            i = min(bisect.bisect_right(knots, n), len(knots) - 1)
            t = (n - knots[i - 1]) / (knots[i] - knots[i - 1])
            hats[i - 1], hats[i] = 1 - t, t
        return hats + [float(f.kv_read), f.prefill_pairs, float(f.remote_holders)]

    def as_dict(self) -> dict:
        """The fitted curve and rates, JSON-ready (for /v1/cluster and the live page)."""
        return {
            "fitted": self.fitted,
            "records": self.num_records,
            "weights_s": [[k, w] for k, w in zip(self._knots, self._w)],
            "attention_tokens_per_s": (1 / self.sec_per_kv_token
                                       if self.sec_per_kv_token > 0 else None),
            "prefill_pair_s": self.sec_per_prefill_pair,
            "remote_holder_s": self.sec_per_remote_holder,
        }


def nonneg_lstsq(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Least squares with non-negative coefficients: refit without the negative ones until none
    is left (an active-set shortcut, exact when at most a few columns are clamped). Also the
    fit of `infinillm calibrate`."""
    a, b = np.asarray(rows, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    active = list(range(a.shape[1]))
    while True:
        sol = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        if (sol >= 0).all() or len(active) == 1:
            coef = np.zeros(a.shape[1])
            coef[active] = np.maximum(sol, 0.0)
            return coef.tolist()
        active = [j for j, s in zip(active, sol) if s >= 0]
