"""Structured output through the engine (SamplingParams.json_schema), on the tiny random Llama
given a small byte-level BPE tokenizer: random weights follow no schema of their own, so every
valid output is the grammar's doing. Outputs are checked by `json.loads` and the `jsonschema`
package (installed with ray), an independent validator; unconstrained neighbours against the
same requests run alone."""

from __future__ import annotations

import json
import shutil

import jsonschema
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from infinillm import LLM, SamplingParams

EOS = "<|endoftext|>"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "member"],
    "additionalProperties": False,
}
COLOR = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]},
                   "shade": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["color", "shade"],
    "additionalProperties": False,
}
TAGS = {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1,
        "maxItems": 4}
# long enough (8 strings of at least 3 characters) to be preempted on the way
LONG = {"type": "array", "items": {"type": "string", "minLength": 3, "maxLength": 6},
        "minItems": 8, "maxItems": 8}
SCHEMAS = [PERSON, COLOR, TAGS]


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tiny_llama, tmp_path_factory) -> str:
    """The tiny Llama plus a small byte-level BPE (fewer than its 512 logits: the last ids
    belong to no token), EOS the special token 0."""
    folder = tmp_path_factory.mktemp("tiny-llama-tokenizer")
    shutil.copytree(tiny_llama, folder, dirs_exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [json.dumps(s) for s in SCHEMAS] + ['{"name": "Ada", "age": 36, "member": true}',
                                                '["red", "green", "blue"]'] * 3
    tokenizer.train_from_iterator(corpus, trainer)
    assert tokenizer.token_to_id(EOS) == 0 and 300 < tokenizer.get_vocab_size() < 512
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    config = json.loads((folder / "config.json").read_text())
    config.update(eos_token_id=0, bos_token_id=None)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").unlink(missing_ok=True)
    return str(folder)


@pytest.fixture(scope="module")
def llm(tiny_with_tokenizer):
    return LLM(tiny_with_tokenizer, block_size=8)


def check_valid(out, schema: dict) -> None:
    completion = out.outputs[0]
    assert completion.finish_reason == "stop", completion
    value = json.loads(completion.text)
    jsonschema.validate(value, schema)


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "enum", "array"])
def test_greedy_and_seeded_outputs_follow_the_schema(llm, schema):
    prompts = ["Hello", "A person:", "x y z"]
    params = [SamplingParams(max_tokens=120, temperature=0, json_schema=schema),
              SamplingParams(max_tokens=120, temperature=1.0, seed=7, json_schema=schema),
              SamplingParams(max_tokens=120, temperature=0.8, top_p=0.9, top_k=50, seed=8,
                             json_schema=json.dumps(schema))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out in outs:
        check_valid(out, schema)
    # a seeded constrained request is reproducible
    again = llm.generate(prompts[1], params[1], use_tqdm=False)[0]
    assert again.outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert not llm.engine.structured.matchers


def test_the_unconstrained_model_does_not_follow_the_schema(llm):
    """The control: without the grammar, greedy output of the random model is no JSON."""
    out = llm.generate("Hello", SamplingParams(max_tokens=40, temperature=0), use_tqdm=False)[0]
    with pytest.raises(ValueError):
        json.loads(out.outputs[0].text)


def test_eos_only_once_the_value_is_complete(llm):
    """EOS pushed up by logit_bias is sampled as soon as the grammar accepts (an integer after
    its first digit may go on, or end), never before: the output is a complete integer."""
    schema = {"type": "integer"}
    out = llm.generate("Hello", SamplingParams(max_tokens=20, temperature=0, json_schema=schema,
                                               logit_bias={0: 100.0}), use_tqdm=False)[0]
    completion = out.outputs[0]
    assert completion.finish_reason == "stop" and completion.token_ids[-1] == 0
    assert len(completion.token_ids) >= 2
    assert isinstance(json.loads(completion.text), int)


def test_a_token_outside_the_grammar_ends_the_request_not_the_engine(llm):
    """Only possible when min_tokens bans every allowed token (its stop_token_ids): here the
    one value of the schema is 5, and the token "5" is a stop token banned for 5 tokens."""
    five = llm.get_tokenizer().encode("5")
    assert len(five) == 1
    params = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=five, min_tokens=5,
                            json_schema={"type": "integer", "minimum": 5, "maximum": 5})
    out = llm.generate("Hello", params, use_tqdm=False)[0]
    assert out.finished and len(out.outputs[0].token_ids) == 1
    assert out.outputs[0].token_ids != five
    assert not llm.engine.structured.matchers
    llm.engine.check_integrity()
    # the engine goes on: the same schema without the ban gives its one value
    params = SamplingParams(max_tokens=20, temperature=0, json_schema=params.json_schema)
    assert llm.generate("Hello", params, use_tqdm=False)[0].outputs[0].text == "5"


def test_json_object_gives_a_json_object(llm):
    """{"type": "object"} (OpenAI's json_object): a parseable object whenever the grammar
    completes; with random weights an object may stay open to max_tokens, so several seeds
    are drawn and at least one must complete."""
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=s,
                             json_schema={"type": "object"}) for s in range(6)]
    outs = llm.generate(["Hello"] * 6, params, use_tqdm=False)
    done = [o for o in outs if o.outputs[0].finish_reason == "stop"]
    assert done
    for out in done:
        assert isinstance(json.loads(out.outputs[0].text), dict)
    for out in outs:  # the others are the start of an object
        assert out.outputs[0].text.startswith("{")


def test_unconstrained_neighbours_are_untouched(llm):
    """Greedy requests batched with constrained ones give exactly the tokens they give alone:
    the mask touches only the constrained rows."""
    free = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=16, temperature=0.9, seed=3, ignore_eos=True)]
    alone = llm.generate(["one", "two"], free, use_tqdm=False)
    mixed = llm.generate(["A", "one", "B", "two"],
                         [SamplingParams(max_tokens=60, temperature=0, json_schema=PERSON),
                          free[0], SamplingParams(max_tokens=60, temperature=0,
                                                  json_schema=COLOR), free[1]],
                         use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert mixed[3].outputs[0].token_ids == alone[1].outputs[0].token_ids
    check_valid(mixed[0], PERSON)
    check_valid(mixed[2], COLOR)


def test_matchers_are_freed_on_finish_and_abort(llm):
    engine = llm.engine
    compiled = set(engine.structured._compiled)
    for i in range(12):
        rid = engine.add_request("Hello", SamplingParams(max_tokens=60, temperature=0,
                                                         json_schema=COLOR))
        if i % 3 == 0:
            engine.step()
            engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()
    assert not engine.structured.matchers
    # one compiled grammar per distinct schema, whatever the number of requests
    assert set(engine.structured._compiled) - compiled <= {json.dumps(COLOR)}
    engine.check_integrity()


def test_a_preempted_constrained_request_stays_valid(tiny_with_tokenizer):
    """A pool too small for the batch preempts by recompute; the matcher, kept with the request
    in the engine, continues from the output so far."""
    llm = LLM(tiny_with_tokenizer, block_size=8, kv_blocks_per_instance=10,
              max_num_batched_tokens=32)
    preempted = []
    scheduler = llm.engine.instances[0].scheduler
    preempt = scheduler.preempt
    scheduler.preempt = lambda request: (preempted.append(request.request_id), preempt(request))
    free = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    params = [SamplingParams(max_tokens=70, temperature=0, json_schema=LONG), free,
              SamplingParams(max_tokens=70, temperature=1.0, seed=5, json_schema=LONG), free]
    outs = llm.generate([[5] * 17, [6] * 30, [7] * 3, [8] * 25], params, use_tqdm=False)
    constrained = {outs[0].request_id, outs[2].request_id}
    assert constrained & set(preempted), preempted
    check_valid(outs[0], LONG)
    check_valid(outs[2], LONG)
    llm.engine.check_integrity()
    assert llm.engine.num_free_blocks() == [10]


@pytest.mark.parametrize("schema, reason", [
    ({"type": "colour"}, "Invalid type: colour"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum (5) is greater than maximum (1)"),
    ({"type": "string", "pattern": "("}, "unclosed group"),
    ("{not json", "json_schema is not a JSON schema"),
])
def test_a_schema_that_does_not_compile_is_refused(llm, schema, reason):
    with pytest.raises(ValueError, match="^json_schema") as error:
        llm.engine.add_request("Hello", SamplingParams(json_schema=schema))
    assert reason in str(error.value)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("schema", [{"type": {1, 2}}, 7, ["x"]])
def test_a_json_schema_that_is_no_json_text_or_object_is_refused(schema):
    with pytest.raises(ValueError, match="^json_schema"):
        SamplingParams(json_schema=schema)


def test_a_model_without_tokenizer_refuses_a_schema(tiny_llama):
    llm = LLM(tiny_llama)
    with pytest.raises(ValueError, match="json_schema needs the model's tokenizer"):
        llm.engine.add_request([1, 2, 3], SamplingParams(json_schema=PERSON))
