"""Every setting is declared once, in infinillm/config.py; `LLM` and the CLI derive from it.

The surface tests walk the dataclass fields themselves (not the derived `SETTINGS`), so a field
added to any config dataclass fails here unless it is an `LLM` keyword and a CLI flag with the
same default whose value reaches the `Config`.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from infinillm import LLM
from infinillm.cli import build_parser, config_kwargs
from infinillm.config import (
    SETTINGS,
    CacheConfig,
    Config,
    ModelConfig,
    format_size,
    parse_size,
)


def all_fields() -> list[tuple[str, dataclasses.Field]]:
    return [(section.name, f) for section in dataclasses.fields(Config)
            for f in dataclasses.fields(section.default_factory())]


def test_every_field_is_a_setting():
    assert [f.name for _, f in all_fields()] == [s.name for s in SETTINGS]


@pytest.mark.parametrize("section, f", all_fields(), ids=lambda x: getattr(x, "name", x))
def test_every_field_is_an_llm_keyword_and_a_flag_with_its_default(section, f):
    param = inspect.signature(LLM).parameters[f.name]
    assert param.default == f.default
    assert param.kind == (param.POSITIONAL_OR_KEYWORD if f.name == "model" else param.KEYWORD_ONLY)
    assert f.name in LLM.__doc__
    for command in (["serve"], ["generate", "hi"]):
        assert getattr(build_parser().parse_args(command), f.name) == f.default


def other_value(f: dataclasses.Field):
    """A valid value that is not the default, for any setting."""
    setting = next(s for s in SETTINGS if s.name == f.name)
    if f.name == "device":  # a str with a checked form
        return "cpu"
    if setting.choices:
        return next(c for c in setting.choices if c != f.default)
    return {bool: not f.default, int: 3, float: 0.5, str: "x"}[setting.value_type]


def flag_for(name: str, value) -> list[str]:
    if isinstance(value, bool):
        return [f"--{'' if value else 'no-'}{name.replace('_', '-')}"]
    return [f"--{name.replace('_', '-')}", str(value)]


@pytest.mark.parametrize("section, f", all_fields(), ids=lambda x: getattr(x, "name", x))
def test_a_flag_value_reaches_the_config(section, f):
    value = other_value(f)
    args = build_parser().parse_args(["serve", *flag_for(f.name, value)])
    config = Config.from_kwargs(**config_kwargs(args))
    assert getattr(getattr(config, section), f.name) == value
    assert config == Config.from_kwargs(**{f.name: value})


def test_from_kwargs_nests_flat_names():
    config = Config.from_kwargs(model="m", block_size=8, num_instances=2, max_num_seqs=4,
                                device="cuda", recall_blocks_per_step=0)
    assert (config.model.model, config.cache.block_size, config.cluster.num_instances,
            config.scheduler.max_num_seqs, config.runtime.device,
            config.cluster.recall_blocks_per_step) == ("m", 8, 2, 4, "cuda", 0)
    assert Config.from_kwargs() == Config()
    assert Config.from_kwargs(model=Path("/models/x")).model.model == "/models/x"


@pytest.mark.parametrize(
    "name, match",
    [
        ("kv_blocks", "unknown setting 'kv_blocks'; did you mean 'kv_blocks_per_instance'"),
        ("instances", "did you mean 'num_instances'"),
        ("threads", "did you mean 'num_threads'"),
        ("max_num_seq", "did you mean 'max_num_seqs'"),
        ("lendng", "did you mean 'lending'"),
        ("colour", "unknown setting 'colour'; the settings are model, dtype, "),
    ],
)
def test_unknown_keyword_names_the_closest(name, match):
    with pytest.raises(TypeError, match=match):
        Config.from_kwargs(**{name: 1})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_size": True}, "block_size must be an int, got True"),
        ({"max_num_seqs": "64"}, "max_num_seqs must be an int, got '64'"),
        ({"kv_blocks_per_instance": 1.5}, "kv_blocks_per_instance must be an int or None, got 1.5"),
        ({"model": 3}, "model must be a str or None, got 3"),
        ({"lending": 1}, "lending must be a bool, got 1"),
        ({"max_lent_fraction": "0.5"}, "max_lent_fraction must be a float, got '0.5'"),
        ({"executor": "mpi"}, r"executor must be one of \('inproc', 'ray', 'sim'\), got 'mpi'"),
        ({"max_model_len": 0}, "max_model_len must be positive, got 0"),
        ({"kv_cache_memory_bytes": 0}, "kv_cache_memory_bytes must be positive, got 0"),
        ({"num_threads": 0}, "num_threads must be positive, got 0"),
        ({"cpus_per_instance": 0.0}, "cpus_per_instance must be positive, got 0.0"),
        ({"dist_timeout_s": -1}, "dist_timeout_s must be positive, got -1"),
        ({"recall_blocks_per_step": -1}, "recall_blocks_per_step must be >= 0, got -1"),
        ({"recall_headroom_fraction": 2}, r"recall_headroom_fraction must be in \[0, 1\], got 2"),
        ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ({"device": "cuda:x"}, "device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
        ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization must be in \[0, 1\], got 1.5"),
        ({"gpu_memory_utilization": 0}, "gpu_memory_utilization must be positive, got 0"),
        ({"dtype": "fp8"}, "dtype must be one of"),
    ],
)
def test_bad_values_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Config.from_kwargs(**kwargs)


def test_sub_configs_validate_on_their_own():
    with pytest.raises(ValueError, match="block_size must be positive, got 0"):
        CacheConfig(block_size=0)
    assert ModelConfig(dtype="bfloat16").dtype == "bfloat16"
    assert CacheConfig(kv_cache_memory_bytes=1).kv_cache_memory_bytes == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        CacheConfig().block_size = 8


@pytest.mark.parametrize(
    "text, num_bytes",
    [("2147483648", 2 << 30), ("2GiB", 2 << 30), ("2G", 2 << 30), ("2gib", 2 << 30),
     ("2 GiB", 2 << 30), ("512MiB", 512 << 20), ("1.5GiB", 3 << 29), ("2GB", 2 * 10**9),
     ("64k", 64 << 10), ("1T", 1 << 40)],
)
def test_parse_size(text, num_bytes):
    assert parse_size(text) == num_bytes


@pytest.mark.parametrize("text", ["", "GiB", "-1", "2XB", "2 G i B", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match=f"expected a size such as 2GiB.*got {text!r}"):
        parse_size(text)


def test_format_size():
    assert [format_size(n) for n in (2 << 30, 3 << 29, 64 << 10, 1000, 0)] == [
        "2GiB", "1536MiB", "64KiB", "1000", "0"]
