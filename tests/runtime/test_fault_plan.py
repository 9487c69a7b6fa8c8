"""FaultPlan: which call fails an instance (the engine-level cases are tests/engine/test_faults.py
and tests/runtime/test_ray_faults.py)."""

from __future__ import annotations

import pytest

from infinillm.runtime.faults import FaultPlan, InjectedFault
from infinillm.types import InstanceId


def test_a_plan_fails_its_instance_once_at_the_nth_time_it_reaches_its_point():
    plan = FaultPlan("exchange.during", InstanceId(1), hit=2)
    plan("exchange.during", InstanceId(0))  # another instance
    plan("exchange.before", InstanceId(1))  # another point
    plan("exchange.during", InstanceId(1))  # the first time
    assert not plan.fired
    with pytest.raises(InjectedFault, match="'exchange.during' on instance 1") as raised:
        plan("exchange.during", InstanceId(1))
    assert (raised.value.point, raised.value.instance) == ("exchange.during", 1)
    assert plan.fired
    plan("exchange.during", InstanceId(1))  # once only


def test_a_plan_names_a_known_point_and_counts_from_one():
    with pytest.raises(ValueError, match="unknown fault point 'recall'"):
        FaultPlan("recall", InstanceId(0))
    with pytest.raises(ValueError, match="hit counts from 1, got 0"):
        FaultPlan("move", InstanceId(0), hit=0)
