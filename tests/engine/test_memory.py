"""MemoryTrimmer trims at most once per interval, on the clock it is given."""

from __future__ import annotations

import platform

import pytest

from infinillm.engine.memory import MemoryTrimmer


def test_trims_once_per_interval():
    now = [100.0]
    trimmer = MemoryTrimmer(30.0, clock=lambda: now[0])
    calls = []
    trimmer.trim = lambda: calls.append(now[0])
    assert not trimmer.maybe_trim()
    now[0] = 129.9
    assert not trimmer.maybe_trim()
    now[0] = 130.0
    assert trimmer.maybe_trim()
    now[0] = 150.0
    assert not trimmer.maybe_trim()
    now[0] = 160.0
    assert trimmer.maybe_trim()
    assert calls == [130.0, 160.0] and trimmer.num_trims == 2


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_glibc_trim_runs():
    trimmer = MemoryTrimmer(1.0, clock=iter([0.0, 5.0]).__next__)
    assert trimmer.trim is not None
    assert trimmer.maybe_trim()


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval_s must be > 0, got 0"):
        MemoryTrimmer(0)
