"""Device profiles of the simulator: what one device (one GPU, or this CPU) can do.

A profile holds the few rates the cost model (cost.py) needs: peak dense FLOP/s at the simulated
precision, memory size and bandwidth, the links between devices (inside a node and between
nodes), and host-side overheads. The GPU presets come from NVIDIA's datasheets; each constant
names its source in `sources`, and docs/simulation.md lists them. Constants that no datasheet
gives (achieved efficiencies, latencies, host overheads) are marked as assumptions there.

The `cpu` profile is measured on this machine by `infinillm calibrate` (calibrate.py) and read
back from its JSON file; `load_profile` takes a preset name or the path of such a file.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1 << 30
GB = 10**9


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    name: str
    memory_bytes: int
    peak_flops: float  # dense, at the simulated precision (tensor cores for bf16/fp16)
    memory_bandwidth: float  # bytes/s
    # Achieved share of `peak_flops` by a GEMM with M rows (tokens), as (M, share) points; read
    # between points by log-linear interpolation, flat beyond the ends.
    gemm_efficiency: tuple[tuple[int, float], ...]
    memory_efficiency: float  # achieved share of memory_bandwidth by streaming kernels
    attention_bandwidth: float  # bytes/s of K/V that attention reads (decode is bound by it)
    attention_call_s: float  # per attention call per layer (a request's chunk, or a holder's)
    gpus_per_node: int  # devices joined by the intra-node link
    intra_node_bandwidth: float  # bytes/s, one direction, device to device (NVLink)
    intra_node_latency_s: float  # one message
    inter_node_bandwidth: float  # bytes/s, one direction, per device (its share of the NICs)
    inter_node_latency_s: float
    step_overhead_s: float  # host time per instance step (scheduling, launch, sampling)
    seq_overhead_s: float  # host time per request in a step
    layer_overhead_s: float  # per layer per step (kernel launches, interpreter)
    token_overhead_s: float = 0.0  # host time per token in a step (beyond the modelled work)
    # This engine's CPU attention path: short all-local decodes share one call padded to the
    # longest context (runtime/traffic.py); GPU kernels read each request's own blocks.
    padded_decode: bool = False
    gpu_memory_utilization: float = 0.9  # share of memory the engine may use (vLLM's default)
    activation_reserve_bytes: int = 2 * GiB  # kept out of the KV pool for activations
    sources: dict[str, str] = field(default_factory=dict)

    def gemm_share(self, m: int) -> float:
        points = self.gemm_efficiency
        ms = [p[0] for p in points]
        i = bisect.bisect_left(ms, m)
        if i == 0:
            return points[0][1]
        if i == len(points):
            return points[-1][1]
        (m0, e0), (m1, e1) = points[i - 1], points[i]
        t = (math.log(m) - math.log(m0)) / (math.log(m1) - math.log(m0))
        return e0 + t * (e1 - e0)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["gemm_efficiency"] = [list(p) for p in self.gemm_efficiency]
        return json.dumps(data, indent=1)

    @classmethod
    def from_dict(cls, data: dict, origin: str) -> DeviceProfile:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(data) - names, {
            f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        } - set(data)
        if unknown or missing:
            raise ValueError(f"{origin}: not a device profile (unknown keys {sorted(unknown)}, "
                             f"missing {sorted(missing)})")
        data = dict(data)
        data["gemm_efficiency"] = tuple((int(m), float(e)) for m, e in data["gemm_efficiency"])
        profile = cls(**data)
        for f in dataclasses.fields(cls):
            value = getattr(profile, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"{origin}: {f.name} must be true or false, got {value!r}")
            if f.type in ("float", "int") and not (isinstance(value, (int, float))
                                                   and value >= 0):
                raise ValueError(f"{origin}: {f.name} must be a number >= 0, got {value!r}")
        return profile


# Achieved GEMM share of peak by M (an assumption, not a datasheet figure): small-M GEMMs are
# bound by reading the weights anyway (the roofline's memory term), large ones reach about 70 %.
_GPU_GEMM = ((1, 0.05), (16, 0.25), (64, 0.45), (256, 0.65), (1024, 0.72), (8192, 0.75))
_ASSUMED = "assumption (docs/simulation.md, 'Constants')"

_A100_DATASHEET = "NVIDIA A100 Tensor Core GPU datasheet (2021), SXM4 80GB column"
_H100_DATASHEET = "NVIDIA H100 Tensor Core GPU datasheet (2023), H100 SXM column"
_H200_DATASHEET = "NVIDIA H200 Tensor Core GPU datasheet (2024), H200 SXM column"


def _gpu(name: str, memory_bytes: int, peak_flops: float, memory_bandwidth: float,
         nvlink: float, nic: float, sources: dict[str, str]) -> DeviceProfile:
    return DeviceProfile(
        name=name, memory_bytes=memory_bytes, peak_flops=peak_flops,
        memory_bandwidth=memory_bandwidth, gemm_efficiency=_GPU_GEMM, memory_efficiency=0.8,
        attention_bandwidth=0.8 * memory_bandwidth, attention_call_s=2e-6, gpus_per_node=8,
        intra_node_bandwidth=nvlink, intra_node_latency_s=10e-6, inter_node_bandwidth=nic,
        inter_node_latency_s=20e-6, step_overhead_s=3e-3, seq_overhead_s=20e-6,
        layer_overhead_s=20e-6,
        sources={**sources,
                 "gemm_efficiency": _ASSUMED, "memory_efficiency": _ASSUMED,
                 "attention_bandwidth": "memory_bandwidth x memory_efficiency (" + _ASSUMED + ")",
                 "attention_call_s": _ASSUMED, "gpus_per_node": "DGX/HGX 8-GPU baseboard",
                 "intra_node_latency_s": _ASSUMED, "inter_node_latency_s": _ASSUMED,
                 "step_overhead_s": _ASSUMED, "seq_overhead_s": _ASSUMED,
                 "layer_overhead_s": _ASSUMED,
                 "gpu_memory_utilization": "vLLM's default gpu_memory_utilization",
                 "activation_reserve_bytes": _ASSUMED})


PRESETS: dict[str, DeviceProfile] = {
    "a100-80gb": _gpu(
        "a100-80gb", 80 * GiB, 312e12, 2039 * GB, 300 * GB, 25 * GB,
        {"memory_bytes": _A100_DATASHEET + ": 80GB HBM2e",
         "peak_flops": _A100_DATASHEET + ": BF16 Tensor Core 312 TFLOPS (dense)",
         "memory_bandwidth": _A100_DATASHEET + ": 2,039 GB/s",
         "intra_node_bandwidth": _A100_DATASHEET + ": NVLink 600 GB/s (both directions)",
         "inter_node_bandwidth": "NVIDIA DGX A100 datasheet: 8x 200 Gb/s HDR InfiniBand, "
                                 "one per GPU (25 GB/s)"}),
    "h100-80gb": _gpu(
        "h100-80gb", 80 * GiB, 989e12, 3350 * GB, 450 * GB, 50 * GB,
        {"memory_bytes": _H100_DATASHEET + ": 80GB HBM3",
         "peak_flops": _H100_DATASHEET + ": BF16 Tensor Core 1,979 TFLOPS with sparsity, "
                                         "989 dense",
         "memory_bandwidth": _H100_DATASHEET + ": 3.35 TB/s",
         "intra_node_bandwidth": _H100_DATASHEET + ": NVLink 900 GB/s (both directions)",
         "inter_node_bandwidth": "NVIDIA DGX H100 datasheet: 8x 400 Gb/s ConnectX-7 "
                                 "(NDR InfiniBand), one per GPU (50 GB/s)"}),
    "h200-141gb": _gpu(
        "h200-141gb", 141 * GB, 989e12, 4800 * GB, 450 * GB, 50 * GB,
        {"memory_bytes": _H200_DATASHEET + ": 141GB HBM3e",
         "peak_flops": _H200_DATASHEET + ": BF16 Tensor Core 1,979 TFLOPS with sparsity, "
                                         "989 dense",
         "memory_bandwidth": _H200_DATASHEET + ": 4.8 TB/s",
         "intra_node_bandwidth": _H200_DATASHEET + ": NVLink 900 GB/s (both directions)",
         "inter_node_bandwidth": "NVIDIA DGX H200 datasheet: 8x 400 Gb/s ConnectX-7, "
                                 "one per GPU (50 GB/s)"}),
}
CPU_PROFILE_NAME = "cpu"


def default_cpu_profile_path() -> Path:
    from infinillm.model.default_model import cache_dir

    return cache_dir() / "sim" / "cpu-profile.json"


def profile_names() -> tuple[str, ...]:
    return (*PRESETS, CPU_PROFILE_NAME)


def load_profile(name: str) -> DeviceProfile:
    """A preset by name, `cpu` (this machine, once calibrated), or a profile JSON file."""
    if name in PRESETS:
        return PRESETS[name]
    if name == CPU_PROFILE_NAME:
        path = default_cpu_profile_path()
        if not path.is_file():
            raise ValueError(f"device 'cpu' is not calibrated on this machine yet: run "
                             f"`infinillm calibrate` (writes {path})")
    else:
        path = Path(name).expanduser()
        if path.suffix != ".json" or not path.is_file():
            raise ValueError(f"unknown device {name!r}; valid: {', '.join(profile_names())} "
                             "or a profile .json file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a device profile (expected a JSON object)")
    return DeviceProfile.from_dict(data, str(path))
