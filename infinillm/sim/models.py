"""Model presets of the simulator: the config.json fields that set a model's shapes.

The simulator needs only shapes (layers, widths, heads, vocabulary), never weights. Each preset
is the relevant part of the model's published config.json on the Hugging Face Hub (the repos
named in `SOURCES`). `max_position_embeddings` is raised to `SIM_MAX_POSITIONS`: the paper
serves LLaMA2 far beyond its trained 4K context, and a simulation computes no positions, so the
length a request may have is set by the cluster's memory alone. A local folder with a
config.json works too.
"""

from __future__ import annotations

import json
from pathlib import Path

SIM_MAX_POSITIONS = 1 << 24

_LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-5,
          "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
_LLAMA3 = {**_LLAMA, "bos_token_id": 128000, "eos_token_id": 128001, "rope_theta": 500000.0,
           "vocab_size": 128256}

PRESETS: dict[str, dict] = {
    "llama2-7b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "vocab_size": 32000},
    "llama2-13b": {**_LLAMA, "hidden_size": 5120, "intermediate_size": 13824,
                   "num_hidden_layers": 40, "num_attention_heads": 40,
                   "num_key_value_heads": 40, "vocab_size": 32000},
    "llama2-70b": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672,
                   "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                   "vocab_size": 32000},
    "llama3-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama3-70b": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672,
                   "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
}
SOURCES = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf config.json",
    "llama2-13b": "meta-llama/Llama-2-13b-hf config.json",
    "llama2-70b": "meta-llama/Llama-2-70b-hf config.json",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B config.json",
    "llama3-70b": "meta-llama/Meta-Llama-3-70B config.json",
}


def sim_model_folder(model: str | None) -> Path:
    """The folder whose config.json describes `model`: a preset (written once into the cache)
    or a local folder with a config.json. ValueError naming the presets otherwise."""
    if model in PRESETS:
        from infinillm.model.default_model import cache_dir

        folder = cache_dir() / "sim" / "models" / model
        config = {**PRESETS[model], "max_position_embeddings": SIM_MAX_POSITIONS}
        text = json.dumps(config, indent=1, sort_keys=True)
        path = folder / "config.json"
        if not path.is_file() or path.read_text() != text:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)
        return folder
    if model is not None and (Path(model).expanduser() / "config.json").is_file():
        return Path(model).expanduser()
    raise ValueError(f"unknown model {model!r} for the simulator; valid: "
                     f"{', '.join(PRESETS)}, or a folder with a config.json")
