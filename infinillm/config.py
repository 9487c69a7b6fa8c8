"""Frozen configuration, one small dataclass per subsystem, composed into `Config`.

Each field is the one declaration of a setting: its name is the `LLM(...)` keyword, and
`setting(...)` gives it the help text, choices and CLI details from which `LLM`'s signature and
the command line flags are derived (`SETTINGS` lists them all). Adding a setting means adding a
field here and nothing else.

Values are validated where they are declared: types and choices from the declaration, ranges in
`__post_init__`. Measured facts (how many blocks fit in a memory budget) are computed at
start-up by the runtime, not stored here.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_ATTENTION_BACKENDS = ("auto", "torch", "cpu_flash", "triton")
_EXECUTORS = ("inproc", "ray", "sim")


# --- declaring a setting -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alias:
    """Another CLI flag for a setting, kept so that existing command lines keep working.

    `parse` reads the flag's text when its unit differs from the setting's (GiB for bytes).
    """

    flag: str
    parse: Callable[[str], Any] | None = None
    help: str | None = None
    metavar: str | None = None


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
            aliases: tuple[str | Alias, ...] = (), parse: Callable[[str], Any] | None = None,
            show: Callable[[Any], str] = str, metavar: str | None = None) -> Any:
    """A config field with what user-facing surfaces need: `help` (what the value means, and
    what "unset" means when the default is None), fixed `choices`, older flag `aliases`, `parse`
    for CLI text the type itself cannot read, `show` for the default in help pages."""
    details = dict(help=help, choices=choices, aliases=aliases, parse=parse, show=show,
                   metavar=metavar)
    return field(default=default, metadata={"setting": details})


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting as the surfaces see it: where it lives, its value type, and its declaration.

    `value_type` is the value type without None (int, float, str or bool); `optional` says whether
    None is allowed (and means "unset", explained by `help`).
    """

    name: str
    section: str
    value_type: type
    optional: bool
    annotation: Any
    default: Any
    help: str
    choices: tuple[str, ...] | None
    aliases: tuple[str | Alias, ...]
    parse: Callable[[str], Any] | None
    show: Callable[[Any], str]
    metavar: str | None


# --- sizes -----------------------------------------------------------------------------------

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?b)?)?\s*", re.IGNORECASE)
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """Bytes from `2147483648`, `2GiB`, `2G` (binary: 2 * 2**30) or `2GB` (decimal: 2 * 10**9)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"expected a size such as 2GiB, 512MiB or a number of bytes, got {text!r}")
    digits, prefix, suffix = match.groups()
    number = int(digits) if digits.isdigit() else float(digits)  # exact for whole byte counts
    if prefix is None:
        return int(number)
    base = 1000 if suffix is not None and suffix.lower() == "b" else 1024
    return int(number * base ** _POWERS[prefix.lower()])


def format_size(num_bytes: int) -> str:
    """The shortest exact binary-unit spelling: 2147483648 -> '2GiB', 1000 -> '1000'."""
    for unit, power in (("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if num_bytes and num_bytes % 1024**power == 0:
            return f"{num_bytes // 1024**power}{unit}"
    return str(num_bytes)


def _gib(text: str) -> int:
    try:
        return int(float(text) * (1 << 30))
    except (ValueError, OverflowError):  # "lots", "nan", "inf"
        raise ValueError(f"expected a number of GiB, got {text!r}") from None


# --- the settings ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which model to run, in which precision."""

    model: str | None = setting(
        None, "Hugging Face model folder or .gguf file "
              "(unset: the embedded SmolLM2-135M-Instruct)", metavar="PATH")
    dtype: str = setting("auto", "weights, activations and KV cache (auto: bfloat16 on CUDA, "
                                 "float32 on CPU)", choices=_DTYPES)
    max_model_len: int | None = setting(
        None, "longest prompt plus output, in tokens (unset, or more than the model has: "
              "the model's context length)")

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):  # a pathlib.Path is a fine way to name a folder
            object.__setattr__(self, "model", os.fspath(self.model))
        check_declared(self)
        _require_positive(self, "max_model_len")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The KV cache of one instance: a pool of rBlocks, each a fixed number of tokens."""

    block_size: int = setting(16, "tokens per rBlock")
    kv_blocks_per_instance: int | None = setting(
        None, "rBlocks per instance (unset: as many as the KV cache memory holds)",
        aliases=("--kv-blocks",))
    kv_cache_memory_bytes: int | None = setting(
        None, "KV cache memory per instance in bytes; the command line also takes sizes "
              "such as 2GiB or 512MiB (unset: 2GiB on CPU; on CUDA what "
              "gpu_memory_utilization of the GPU leaves after weights and activations)",
        aliases=(Alias("--kv-memory-gb", parse=_gib, metavar="GIB",
                       help="the same in GiB (older flag)"),),
        parse=parse_size, show=lambda v: "unset" if v is None else format_size(v),
        metavar="SIZE")
    gpu_memory_utilization: float = setting(
        0.9, "on CUDA, the share of the GPU's memory this engine may use: weights, activations "
             "and KV pools (as vLLM's flag); CPU ignores it")

    def __post_init__(self) -> None:
        check_declared(self)
        _require_positive(self, "block_size", "kv_blocks_per_instance", "kv_cache_memory_bytes",
                          "gpu_memory_utilization")
        _require_fraction(self, "gpu_memory_utilization")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Batching limits of one instance's scheduler."""

    max_num_seqs: int = setting(64, "requests in one instance's batch")
    max_num_batched_tokens: int = setting(
        512, "tokens in one instance's step; longer prompts are prefilled in chunks of this size")

    def __post_init__(self) -> None:
        check_declared(self)
        _require_positive(self, "max_num_seqs", "max_num_batched_tokens")


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """How and where workers run.

    With the ray executor, tensors between actors travel over torch.distributed (gloo on CPU,
    NCCL on CUDA, one GPU per actor);
    `dist_timeout_s` bounds a wait on a peer, which is how a dead peer is found mid-step.
    """

    attention_backend: str = setting("auto", "attention kernels", choices=_ATTENTION_BACKENDS)
    num_threads: int | None = setting(
        None, "CPU threads for compute (unset: torch's default; with ray, CPUs per instance)",
        aliases=("--threads",))
    device: str = setting("auto", "torch device of the workers: cpu, cuda, cuda:N, or auto "
                                  "(cuda when torch sees a GPU, else cpu)", metavar="DEVICE")
    executor: str = setting(
        "inproc", "how instances run: inproc = all in this process; ray = one Ray actor each, "
                  "see docs/distributed.md; sim = no model, step times from a cost model on "
                  "simulated time, see docs/simulation.md", choices=_EXECUTORS)
    sim_device: str = setting(
        "a100-80gb", "with the sim executor, the simulated device of each instance: "
                     "a100-80gb, h100-80gb, h200-141gb, cpu (after `infinillm calibrate`) or "
                     "a profile .json file", metavar="DEVICE")
    ray_address: str | None = setting(
        None, "Ray cluster to join, e.g. auto or HOST:6379 (unset: the one started on this "
              "machine with `ray start`, else a new local one)", metavar="ADDRESS")
    cpus_per_instance: float = setting(1.0, "CPUs each Ray actor asks for")
    dist_timeout_s: float = setting(60.0, "with the ray executor, seconds to wait on a peer "
                                          "instance before declaring it lost")
    engine_process: bool = setting(
        True, "serve: run the engine in a process of its own (the API process parses, tokenizes "
              "and streams; see docs/serving.md); the offline LLM always runs in-process")

    def __post_init__(self) -> None:
        check_declared(self)
        _require_positive(self, "num_threads", "cpus_per_instance", "dist_timeout_s")
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """The instances and how they share KV memory."""

    num_instances: int = setting(1, "serving instances sharing one KV pool through lending",
                                 aliases=("--instances",))
    lending: bool = setting(
        True, "an instance that runs out of rBlocks borrows from the others; without it, every "
              "request's KV stays on its own instance (the baseline)")
    placement: str = setting(
        "reactive", "where KV lives: reactive (borrow when a request runs out, recall home "
                    "when the owner has room) or proactive (admission local first; KV of long "
                    "requests moved off instances whose queue cannot start, by a fitted "
                    "step-time model)", choices=("reactive", "proactive"))
    max_lent_fraction: float = setting(
        0.9, "at most this share of an instance's pool is lent to others")
    recall_blocks_per_step: int = setting(
        16, "lent rBlocks moved back to their owner between two steps, at most")
    recall_headroom_fraction: float = setting(
        0.1, "an owner brings rBlocks home only while this share of its pool stays free "
             "for its own requests")

    def __post_init__(self) -> None:
        check_declared(self)
        _require_positive(self, "num_instances")
        _require_fraction(self, "max_lent_fraction", "recall_headroom_fraction")
        if self.recall_blocks_per_step < 0:
            raise ValueError(
                f"recall_blocks_per_step must be >= 0, got {self.recall_blocks_per_step}"
            )


@dataclass(frozen=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Config:
        """The config from flat setting names (`LLM`'s keywords): `num_instances=2` sets
        `cluster.num_instances`. An unknown name raises TypeError naming the closest one."""
        for name in kwargs:
            if name not in _BY_NAME:
                raise TypeError(_unknown_message(name))
        parts: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
        for name, value in kwargs.items():
            parts[_BY_NAME[name].section][name] = value
        return cls(**{section: sub(**parts[section]) for section, sub in _SECTIONS.items()})


# --- validation ----------------------------------------------------------------------------


def check_declared(config: Any) -> None:
    """Check every field of a sub-config against its declared type and choices.

    Ints are accepted for floats; bools are not ints here, because `block_size=True` is a bug.
    """
    for f in dataclasses.fields(config):
        s = _BY_NAME[f.name]
        value = getattr(config, f.name)
        if value is None and s.optional:
            continue
        if not _has_type(value, s.value_type):
            kind = s.value_type.__name__ + (" or None" if s.optional else "")
            raise ValueError(f"{f.name} must be {_article(kind)} {kind}, got {value!r}")
        if s.choices is not None and value not in s.choices:
            raise ValueError(f"{f.name} must be one of {s.choices}, got {value!r}")


def _has_type(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _require_positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def _require_fraction(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


def _unknown_message(name: str) -> str:
    # Old CLI spellings (kv_blocks, instances, threads) are suggestions too: users carry them over.
    spellings = {s.name: s.name for s in SETTINGS}
    for s in SETTINGS:
        for alias in s.aliases:
            flag = alias if isinstance(alias, str) else alias.flag
            spellings.setdefault(flag.lstrip("-").replace("-", "_"), s.name)
    close = difflib.get_close_matches(name, spellings, n=1)
    if close:
        return f"unknown setting {name!r}; did you mean {spellings[close[0]]!r}?"
    return f"unknown setting {name!r}; the settings are {', '.join(_BY_NAME)}"


# --- the derived list --------------------------------------------------------------------------


def _collect(section: str, sub: type) -> Iterator[Setting]:
    hints = typing.get_type_hints(sub)
    for f in dataclasses.fields(sub):
        kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
        value_types = [k for k in kinds if k is not types.NoneType]
        assert len(value_types) == 1, f"{f.name}: one value type, optionally | None"
        yield Setting(name=f.name, section=section, value_type=value_types[0],
                      optional=len(kinds) > 1, annotation=hints[f.name], default=f.default,
                      **f.metadata["setting"])


_SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name]
                              for f in dataclasses.fields(Config)}
SETTINGS: tuple[Setting, ...] = tuple(
    s for section, sub in _SECTIONS.items() for s in _collect(section, sub)
)
_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
assert len(_BY_NAME) == len(SETTINGS), "setting names must be unique across sections"


def section_doc(section: str) -> str:
    """The first line of a section's docstring: its one-line description."""
    return (_SECTIONS[section].__doc__ or section).strip().splitlines()[0]
