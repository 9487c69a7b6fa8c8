"""Attention backends by name: the registry, "auto", and building one for a worker.

A backend module is imported only when a worker asks for it, and this module imports no torch,
so configuration and the command line can list the names cheaply.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infinillm.attention.backend import AttentionBackend

# name -> "module:class". A new backend is one line here (and its name in config.py's tuple,
# which a test keeps equal to `backend_names()`).
_BACKENDS: dict[str, str] = {
    "torch": "infinillm.attention.torch_backend:TorchBackend",
    "cpu_flash": "infinillm.attention.cpu_flash:CpuFlashBackend",
    "triton": "infinillm.attention.triton_backend:TritonBackend",
}

# What "auto" picks on each device type. "triton" also takes CPU tensors, but only under
# Triton's interpreter (TRITON_INTERPRET=1), which is for tests: far slower than cpu_flash.
_AUTO_BY_DEVICE: dict[str, str] = {"cpu": "cpu_flash", "cuda": "triton"}


def backend_names() -> tuple[str, ...]:
    """Every value `get_backend` accepts, "auto" first."""
    return ("auto", *_BACKENDS)


def resolve_backend_name(name: str, device: str = "cpu") -> str:
    """The registered backend that `name` means on `device` ("cpu", "cuda", "cuda:1", ...)."""
    if name == "auto":
        device_type = device.split(":")[0]
        if device_type not in _AUTO_BY_DEVICE:
            raise ValueError(f"attention_backend 'auto' has no backend for device {device!r} "
                             f"yet; choose one of {tuple(_BACKENDS)} that runs there")
        return _AUTO_BY_DEVICE[device_type]
    if name not in _BACKENDS:
        raise ValueError(f"attention_backend must be one of {backend_names()}, got {name!r}")
    return name


def get_backend(name: str, device: str = "cpu") -> AttentionBackend:
    """A new backend object for `name` on `device`; ValueError for an unknown name or a
    backend that cannot take that device's tensors."""
    resolved = resolve_backend_name(name, device)
    module, cls_name = _BACKENDS[resolved].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    device_type = device.split(":")[0]
    if cls.devices is not None and device_type not in cls.devices:
        raise ValueError(f"attention backend {resolved!r} runs on {cls.devices}, "
                         f"not on device {device!r}")
    cls.check_device(device)
    return cls()
