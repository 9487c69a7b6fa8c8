"""Text <-> token ids for serving, without importing transformers (start-up stays fast).

Contract:
- `Tokenizer.from_pretrained(folder)` reads a Hugging Face folder: tokenizer.json (required, run by
  the `tokenizers` library), tokenizer_config.json and special_tokens_map.json (special tokens,
  chat template), chat_template.jinja (takes priority, as in transformers), config.json and
  generation_config.json (EOS ids).
- `encode` matches transformers 5's `AutoTokenizer` for tokenizer.json folders: special tokens
  (BOS/EOS) come from tokenizer.json's post-processor alone; transformers drops
  `add_bos_token`/`add_eos_token` from tokenizer_config.json when tokenizer.json exists, and so
  do we. (transformers rebuilds the pipeline for a few named classes such as LlamaTokenizer from
  their code; that is meant to be equivalent, and we always follow tokenizer.json, like vLLM.)
- `apply_chat_template` renders the template in a sandboxed jinja2 environment set up as
  transformers does (trim_blocks, lstrip_blocks, loop controls, `{% generation %}`,
  `raise_exception`, `strftime_now`, a non-escaping `tojson`, special tokens as variables).
- `IncrementalDetokenizer` turns a stream of sampled ids into text deltas that never end in a
  broken UTF-8 sequence, decoding only a window of a few tokens per step.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer

Message = Mapping[str, Any]

SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_REPLACEMENT_CHAR = "\ufffd"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte as the printable character tokens use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    """A tokenizer.json backend plus what serving needs around it (chat template, EOS ids)."""

    def __init__(
        self,
        backend: BackendTokenizer,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        eos = set(eos_token_ids)
        eos_id = self.token_to_id(self.special_tokens.get("eos_token"))
        if eos_id is not None:
            eos.add(eos_id)
        self.eos_token_ids: set[int] = eos
        self._template: jinja2.Template | None = None

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Tokenizer:
        """Load from a Hugging Face model folder (see the module docstring for the files)."""
        folder = Path(folder)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"no tokenizer.json in {str(folder)!r}")
        config = _read_json(folder / "tokenizer_config.json")
        return cls(
            BackendTokenizer.from_file(str(tokenizer_file)),
            chat_template=_read_chat_template(folder, config),
            special_tokens=_read_special_tokens(folder, config),
            eos_token_ids=_config_eos_ids(folder / "generation_config.json")
            | _config_eos_ids(folder / "config.json"),
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included (`len()` in HF).

        The model's embedding table may be larger (padded); ids beyond this decode to "".
        """
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens per tokenizer.json's post-processor."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r:.80}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, as its text would hold them (a piece of a multi-byte
        character included): exact for byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen) and
        `<0xNN>` byte-fallback pieces; for other pieces their text, `▁` read as a space. Added
        (special) tokens are their own text. b"" for an id the tokenizer does not know."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_ids:
            return piece.encode()
        if self._byte_level and all(c in _BYTE_DECODER for c in piece):
            return bytes(_BYTE_DECODER[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode()

    @functools.cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self.backend.get_added_tokens_decoder())

    @functools.cached_property
    def _byte_level(self) -> bool:
        """Whether tokenizer.json's decoder is (or contains) ByteLevel."""
        decoder = json.loads(self.backend.to_str()).get("decoder") or {}
        kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
        return "ByteLevel" in kinds

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for a conversation of {"role": str, "content": str} messages.

        Keys whose value is None are dropped (as transformers does); other extra keys pass
        through to the template. Malformed messages, and messages the template itself rejects
        through `raise_exception`, raise ValueError. The result is meant for
        `encode(..., add_special_tokens=False)`.
        """
        template = self._compiled_template()
        checked = _checked_messages(messages)
        try:
            return template.render(
                messages=checked,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except jinja2.TemplateError as error:  # raise_exception(), e.g. roles must alternate
            raise ValueError(f"the chat template rejected the messages: {error}") from error

    def _compiled_template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        if self._template is None:
            self._template = _chat_environment().from_string(self.chat_template)
        return self._template


class IncrementalDetokenizer:
    """Text deltas for one request's output ids, decoding a small window per token.

    The window holds context ids (already turned into text) followed by unreturned ids, from
    index `read` on. A delta is the window's text beyond the context's text; it is held back
    while it ends in U+FFFD (a UTF-8 sequence cut between tokens). Once returned, those ids
    become the next context, so the window stays a few tokens long. The prompt's last few ids
    are the initial context, as in vLLM, so the first output token decodes as it does after
    the prompt (unless the prompt ends inside a character). For byte-level BPE tokenizers
    (GPT-2 style: SmolLM2, Llama 3, Qwen2) the deltas plus `flush()` equal
    `decode(output_ids)` exactly; for decoders that strip a leading space (SentencePiece
    style) the text keeps the space that the first output token carries after the prompt,
    which `decode(output_ids)` drops.
    """

    # Tokens of prompt context: enough for any decoder's look-behind (vLLM uses the same).
    PROMPT_CONTEXT = 5

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._window = [int(i) for i in prompt_token_ids[-self.PROMPT_CONTEXT :]]
        self._context_text = self._decode(self._window)
        if self._context_text.endswith(_REPLACEMENT_CHAR):
            # A prompt of raw ids may end inside a character, whose bytes would then merge
            # with the first output bytes. Decode the output on its own instead.
            self._window, self._context_text = [], ""
        self._read = len(self._window)
        self._chunks: list[str] = []
        self._text: str | None = ""

    @property
    def text(self) -> str:
        """All output text returned so far (deltas and flushes)."""
        if self._text is None:
            self._text = "".join(self._chunks)
        return self._text

    def add(self, token_id: int) -> str:
        """Take one output id; return the text it completes ("" while held back)."""
        self._window.append(int(token_id))
        text = self._decode(self._window)
        if len(text) <= len(self._context_text) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Return whatever is held back (at the end of a request), broken bytes as U+FFFD."""
        if self._read == len(self._window):
            return ""
        return self._emit(self._decode(self._window))

    def _emit(self, text: str) -> str:
        delta = text[len(self._context_text) :]
        # The unreturned ids become the context, decoded on their own: the next delta is the
        # text beyond them, so a decoder that treats a window's first token specially agrees.
        del self._window[: self._read]
        self._read = len(self._window)
        self._context_text = self._decode(self._window)
        if delta:
            self._chunks.append(delta)
            self._text = None
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def _checked_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of messages, got {messages!r:.200}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be a dict, got {message!r:.200}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(
                    f"messages[{index}][{key!r}] must be a str, got {message.get(key)!r:.200}"
                )
        checked.append({key: value for key, value in message.items() if value is not None})
    return checked


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers uses it to mark
    assistant tokens for training masks; serving only needs the text)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` for templates without handing them the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _chat_environment() -> ImmutableSandboxedEnvironment:
    """The jinja2 environment transformers renders chat templates in (templates are untrusted)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    return env


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja if present, else tokenizer_config's (str, or named list: "default")."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _token_text(value: Any) -> str | None:
    """A special token as saved: a plain string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_special_tokens(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named special tokens; special_tokens_map.json overrides tokenizer_config (as in HF)."""
    merged = {**config, **_read_json(folder / "special_tokens_map.json")}
    tokens = {name: _token_text(merged.get(name)) for name in SPECIAL_TOKEN_NAMES}
    return {name: text for name, text in tokens.items() if text is not None}


def _config_eos_ids(path: Path) -> set[int]:
    """`eos_token_id` of a config.json / generation_config.json: an int, a list, or absent."""
    value = _read_json(path).get("eos_token_id")
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {i for i in value if isinstance(i, int)}
    return set()
