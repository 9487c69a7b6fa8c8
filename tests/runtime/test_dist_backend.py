"""The multi-process fabric's device facts, without a GPU: which torch.distributed backend a
device takes, and the device an actor uses (Ray shows a CUDA actor its one GPU as cuda:0)."""

from __future__ import annotations

from pathlib import Path

import torch

from infinillm.runtime.dist_fabric import dist_backend
from infinillm.runtime.executor import InstanceSpec
from infinillm.runtime.ray_executor import actor_spec


def test_nccl_for_cuda_tensors_gloo_for_cpu_tensors():
    assert dist_backend("cuda:0") == dist_backend(torch.device("cuda", 3)) == "nccl"
    assert dist_backend("cpu") == dist_backend(torch.device("cpu")) == "gloo"


def test_an_actor_uses_its_one_visible_gpu():
    spec = InstanceSpec(Path("/m"), None, torch.bfloat16, 8, 16, "cuda:3")
    assert actor_spec(spec).device == "cuda:0"
    assert actor_spec(spec).num_blocks == 8
    cpu = InstanceSpec(Path("/m"), None, torch.float32, 8, 16, "cpu")
    assert actor_spec(cpu) == cpu
