"""bench/control_plane_scaling.py at a tiny size: it runs a cluster to the end, counts only
the control plane's time, and leaves the pools whole."""

from __future__ import annotations

import time

import pytest

from bench.control_plane_scaling import executor_class, measure, model_folder, no_model_executor

TINY = dict(block_size=4, max_num_batched_tokens=64, max_num_seqs=8,
            short_len=(5, 20), long_len=(40, 70), new_tokens=(2, 6))


def test_a_tiny_cluster_runs_to_the_end(tmp_path):
    # pools of 20 blocks (80 positions): long prompts borrow, and blocks move
    row = measure(3, 20, 6, 500, model_folder(tmp_path), executor_class("none"), **TINY)
    assert row["instances"] == 3 and row["cluster_blocks"] == 60 and row["requests"] == 18
    assert row["finished"] == 18 and 0 < row["steps"] < 500  # ended before the step cap
    assert row["moves"] > 0
    assert row["control_plane_s"] > 0 and row["ms_per_step_p50"] <= row["ms_per_step_p90"]
    per_chunk_s = row["us_per_chunk"] * row["chunks_per_step"] * row["steps"] / 1e6
    assert per_chunk_s == pytest.approx(row["control_plane_s"])


def test_the_executors_time_is_not_counted(tmp_path):
    plain = no_model_executor()

    class Slow(plain):
        def execute(self, plans):
            time.sleep(0.02)
            return super().execute(plans)

    row = measure(2, 20, 6, 10, model_folder(tmp_path), Slow, **TINY)
    assert row["steps"] == 10 and row["executor_s"] >= 0.2  # every step runs the executor
    assert row["control_plane_s"] < 0.1  # not the 0.2 s it slept
