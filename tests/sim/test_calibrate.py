"""`infinillm calibrate`: the fit, and a whole calibration of a tiny model read back by the
simulator."""

from __future__ import annotations

import json
import random

import pytest

from infinillm.cli import main
from infinillm.cluster.perf_model import nonneg_lstsq
from infinillm.sim.devices import load_profile


def test_the_fit_recovers_known_costs_and_clamps_negative_ones():
    rng = random.Random(0)
    truth = [0.02, 0.001, 0.0003, 0.0]
    rows = [[1.0, s, t, rng.uniform(0, 5000)] for s, t in
            ((rng.randint(1, 32), rng.randint(1, 512)) for _ in range(40))]
    ys = [sum(a * b for a, b in zip(r, truth)) for r in rows]
    assert nonneg_lstsq(rows, ys) == pytest.approx(truth, abs=1e-9)
    # a cost the data says is negative is 0, and the others are refitted without it
    ys = [y - 1e-6 * r[3] for y, r in zip(ys, rows)]
    coef = nonneg_lstsq(rows, ys)
    assert coef[3] == 0.0 and all(c >= 0 for c in coef)


@pytest.mark.slow
def test_calibrating_a_model_writes_a_profile_the_simulator_runs_on(tiny_llama, tmp_path,
                                                                    capsys):
    path = tmp_path / "cpu.json"
    assert main(["calibrate", "--model", tiny_llama, "--output", str(path)]) == 0
    profile = load_profile(str(path))
    assert profile.name == "cpu" and profile.padded_decode
    assert profile.peak_flops > 0 and profile.memory_bandwidth > 0
    assert [m for m, _ in profile.gemm_efficiency] == sorted(m for m, _ in
                                                            profile.gemm_efficiency)
    assert max(e for _, e in profile.gemm_efficiency) == pytest.approx(1.0)
    capsys.readouterr()
    assert main(["simulate", "--model", tiny_llama, "--device", str(path), "--instances", "2",
                 "--trace", "short", "--num-requests", "5", "--rate", "50", "--dtype",
                 "float32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the tiny model's context is short: a request may be refused or cut at its end
    assert result["completed"] + result["refused"] + result["cut_short"] == 5
    assert result["completed"] >= 1 and result["device"] == "cpu"
