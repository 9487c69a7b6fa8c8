"""`response_format` through the official `openai` client against the live server (default
model): json_schema on chat (plain and streamed) and completions, json_object, and the 400s of
a bad type or a schema that does not compile. Outputs are checked by `json.loads` and the
`jsonschema` package, an independent validator."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Describe a person called Ada who is 36, as JSON."}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "member": {"type": "boolean"},
                   "color": {"enum": ["red", "green", "blue"]},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                            "maxItems": 3}},
    "required": ["name", "age", "member", "color", "tags"],
    "additionalProperties": False,
}


def person_format(schema: dict = PERSON) -> dict:
    return {"type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def test_chat_json_schema_greedy_and_seeded(client, served):
    for extra in ({"temperature": 0}, {"temperature": 0.7, "seed": 11}):
        reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=80,
                                               response_format=person_format(), **extra)
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    served.assert_idle()


def test_streamed_json_schema_concatenates_to_the_plain_reply(client):
    kwargs = dict(model=MODEL, messages=ASK, max_tokens=80, temperature=0,
                  response_format=person_format())
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)


def test_completions_take_response_format_too(client):
    reply = client.completions.create(model=MODEL, prompt="A person as JSON:", max_tokens=80,
                                      temperature=0, extra_body={
                                          "response_format": person_format()})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].text), PERSON)


def test_json_object_gives_an_object(client):
    reply = client.chat.completions.create(
        model=MODEL, max_tokens=100, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": 'Reply with the JSON {"capital": "Paris"}.'}])
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.parametrize("response_format, named", [
    ({"type": "xml"}, "type must be 'text', 'json_object' or 'json_schema'"),
    ({"type": "json_schema"}, "needs a json_schema object"),
    ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}},
     "json_schema.schema must be"),
    (person_format({"type": "colour"}), "Invalid type: colour"),
    (person_format({"type": "integer", "minimum": 5, "maximum": 1}),
     "minimum (5) is greater than maximum (1)"),
])
def test_bad_response_formats_are_400s(client, served, response_format, named):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8,
                                       response_format=response_format)
    error = caught.value.body
    assert caught.value.status_code == 400
    assert error["param"] == "response_format" and named in error["message"], error
    served.assert_idle()
