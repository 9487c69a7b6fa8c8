"""Bad input raises ValueError naming the value, and queues nothing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from infinillm import LLM, SamplingParams
from infinillm.engine.intake import Intake


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
        ({"temperature": -0.5}, "temperature must be a number >= 0, got -0.5"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, "got 1.5"),
        ({"stop": [""]}, "stop must be non-empty strings"),
        ({"stop_token_ids": [-1]}, "got \\[-1\\]"),
        ({"seed": "x"}, "seed must be an int or None, got 'x'"),
    ],
)
def test_sampling_params_reject(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, kv_blocks_per_instance=16, block_size=16)


def test_prompts_rejected_before_anything_runs(llm):
    good = [1, 2, 3]
    with pytest.raises(ValueError, match="non-empty"):
        llm.generate([good, []], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt has 1024 tokens; the model's context is 1024"):
        llm.generate([good, [5] * 1024], use_tqdm=False)
    with pytest.raises(ValueError, match="needs 17 KV blocks; an instance holds 16"):
        llm.generate([[5] * 256], use_tqdm=False)
    with pytest.raises(ValueError, match=r"token ids must be ints in \[0, 512\), got \[512\]"):
        llm.generate([[1, 512]], use_tqdm=False)
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        llm.generate("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="got 2 sampling params for 1 prompts"):
        llm.generate([good], [SamplingParams(), SamplingParams()], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.num_free_blocks() == [16]
    out = llm.generate(good, SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("prompt, shown", [
    ([1, True], "[True]"),  # a bool is not a token id
    ([1, -1], "[-1]"),
    ([1.0, 2], "[1.0]"),
    ((3, 512, 600), "[512, 600]"),
])
def test_token_id_prompts_are_checked_whatever_their_form(prompt, shown):
    """Plain in-range ints pass a fast check; anything else gets the exact one."""
    intake = Intake(None, Path("tiny"), 512, 1024, 16, False, lambda: 64)
    assert intake.prepare((0, 511, 7)).token_ids == [0, 511, 7]
    with pytest.raises(ValueError, match=re.escape(f"must be ints in [0, 512), got {shown}")):
        intake.prepare(prompt)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": "float8"}, "dtype must be one of"),
        ({"block_size": 0}, "block_size must be positive, got 0"),
        ({"kv_blocks_per_instance": 0}, "kv_blocks_per_instance must be positive, got 0"),
        ({"num_instances": 0}, "num_instances must be positive, got 0"),
        ({"max_lent_fraction": 1.5}, "max_lent_fraction must be in \\[0, 1\\], got 1.5"),
        ({"attention_backend": "magic"}, "attention_backend must be one of"),
    ],
)
def test_engine_options_reject(tiny_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(tiny_llama, **kwargs)


def test_unknown_options_name_the_closest(tiny_llama):
    with pytest.raises(TypeError, match="unknown setting 'kv_blocks'; did you mean "
                                        "'kv_blocks_per_instance'"):
        LLM(tiny_llama, kv_blocks=16)


def test_missing_and_unsupported_models(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="model path '/no/such/model' does not exist"):
        LLM("/no/such/model")
    bad = tmp_path / "gpt2"
    shutil.copytree(tiny_llama, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        LLM(str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no config.json and 0 .gguf files"):
        LLM(str(empty))
