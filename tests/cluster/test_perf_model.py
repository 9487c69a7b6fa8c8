"""The step-time model recovers a known step-time function from its samples, and reads a plan
as the features the engine runs."""

from __future__ import annotations

import json
import random

import pytest

from infinillm.cluster import StepFeatures, StepTimeModel
from infinillm.types import InstanceId, ScheduledChunk


def true_seconds(f: StepFeatures) -> float:
    """A device whose weights pass costs 10 ms up to 64 tokens, then grows 0.1 ms a token
    (compute bound), plus attention, prefill pairs and 0.3 ms per remote holder."""
    weights = 0.010 + 1e-4 * max(0, f.num_tokens - 64)
    return weights + 2e-7 * f.kv_read + 1e-9 * f.prefill_pairs + 3e-4 * f.remote_holders


def random_features(rng: random.Random) -> StepFeatures:
    n = rng.choice([1, 2, 3, 5, 8, 16, 24, 32, 48, 64, 80, 128, 200, 256, 400, 512])
    return StepFeatures(n, rng.randint(0, 200_000), rng.choice([0.0, rng.uniform(0, 1e6)]),
                        rng.randint(0, 6))


def test_fit_recovers_a_known_step_time_function():
    rng = random.Random(0)
    model = StepTimeModel(window=600)
    for _ in range(600):
        f = random_features(rng)
        model.observe(f, true_seconds(f))
    model.fit()
    assert model.sec_per_kv_token == pytest.approx(2e-7, rel=1e-6)
    assert model.sec_per_prefill_pair == pytest.approx(1e-9, rel=1e-6)
    assert model.sec_per_remote_holder == pytest.approx(3e-4, rel=1e-6)
    for _ in range(200):  # unseen points, between the knots too
        f = StepFeatures(rng.randint(1, 512), rng.randint(0, 300_000), rng.uniform(0, 2e6),
                         rng.randint(0, 8))
        assert model.predict(f) == pytest.approx(true_seconds(f), rel=1e-6)


def test_no_prediction_before_enough_steps_and_noise_is_averaged():
    rng = random.Random(1)
    model = StepTimeModel(min_records=16)
    f = random_features(rng)
    for _ in range(15):
        model.observe(f, true_seconds(f))
    assert model.predict(f) is None and not model.fitted
    model.observe(StepFeatures(), 1.0)  # nothing ran: not a record
    model.observe(f, 0.0)  # no time: not a record
    assert model.num_records == 15
    noisy = StepTimeModel(window=2000, refit_every=10_000)
    for _ in range(2000):
        g = random_features(rng)
        noisy.observe(g, true_seconds(g) * rng.uniform(0.9, 1.1))
    noisy.fit()
    errors = [abs(noisy.predict(g) / true_seconds(g) - 1)
              for g in (random_features(rng) for _ in range(300))]
    assert sorted(errors)[150] < 0.03  # the median step within 3 %
    json.dumps(noisy.as_dict())


def test_coefficients_never_go_negative():
    model = StepTimeModel(min_records=4)
    # time that falls with the KV read: least squares would give a negative rate
    for n, kv, s in [(1, 0, 0.02), (1, 1000, 0.019), (2, 0, 0.021), (2, 2000, 0.018),
                     (4, 0, 0.022), (4, 4000, 0.017)]:
        model.observe(StepFeatures(n, kv), s)
    model.fit()
    assert model.sec_per_kv_token == 0.0
    assert all(w >= 0 for _, w in model.as_dict()["weights_s"])


def test_features_of_a_plan():
    me, other = InstanceId(0), InstanceId(1)

    def chunk(tokens: int, start: int, holders: dict) -> ScheduledChunk:
        return ScheduledChunk("r", [7] * tokens, start, [], True, None, 0, holders)

    f = StepFeatures.of(me, [chunk(1, 99, {me: 7}), chunk(1, 9, {me: 1, other: 2}),
                             chunk(8, 16, {me: 6}), chunk(1, 4, {other: 2})])
    # decodes read their context and the new token; the prefill chunk sees 16 earlier
    # positions and, causally, 1..8 of its own; one remote holder for two of the requests
    assert f == StepFeatures(11, 100 + 10 + 5, 8 * (16 + 4.5), 2)
