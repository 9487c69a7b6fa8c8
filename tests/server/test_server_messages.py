"""The engine-core messages (server/messages.py): every type survives the codec, frames are
MessagePack (a pickle frame is refused, never loaded), and output deltas merge back into exactly
the cumulative outputs the engine made."""

from __future__ import annotations

import pickle

import msgspec
import pytest

from infinillm.server.messages import (
    Abort,
    AddRequest,
    Codec,
    Dead,
    DeltaMaker,
    EngineInfo,
    OutputMerger,
    Outputs,
    Query,
    QueryReply,
    Ready,
    RequestFailure,
    Shutdown,
)
from infinillm.types import (
    CompletionOutput,
    RequestId,
    RequestOutput,
    SamplingParams,
    TokenLogprobs,
)

PARAMS = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, seed=11, stop=["\n"],
                        stop_token_ids=[2], logit_bias={5: -1.5}, min_tokens=2,
                        repetition_penalty=1.1, logprobs=2, prompt_logprobs=1)
INFO = EngineInfo(pid=1, model_path="/m", vocab_size=512, max_model_len=1024, block_size=16,
                  lending=True, num_instances=2, num_blocks_per_instance=8,
                  max_blocks_per_request=15, load_seconds=1.5)
STATS = {"instances": [{"instance": 0, "free_blocks": 8, "step_model": {"a": 0.5}}],
         "debts": [], "placement": None, "lending": True}


def _lp(token: int) -> TokenLogprobs:
    return TokenLogprobs(token, -0.25 * token, [(token, -0.25 * token), (token + 1, -3.0)])


def _output(tokens: list[int], text: str, finished: bool) -> RequestOutput:
    reason = "length" if finished else None
    return RequestOutput(RequestId("r-1"), "a prompt", [3, 4, 5],
                         [CompletionOutput(0, text, tokens, reason, [_lp(t) for t in tokens])],
                         finished, [None, _lp(4), _lp(5)])


TO_CORE = [AddRequest("r-1", "a prompt", [3, 4, 5], PARAMS), AddRequest("r-2", None, [1], PARAMS),
           Abort(["r-1", "r-2"]), Query(7, "cluster_stats"), Shutdown()]
FROM_CORE = [Ready(INFO, STATS),
             Outputs([_output([9, 10], "ab", False)], [RequestFailure("r-2", "bad")], STATS, 15),
             QueryReply(7, value=STATS), QueryReply(8, error="RuntimeError: x"),
             Dead("engine loop failed", bad_config=False)]


@pytest.mark.parametrize("message", TO_CORE, ids=lambda m: type(m).__name__)
def test_messages_to_the_core_round_trip(message):
    codec = Codec()
    frame = codec.encode(message)
    assert codec.decode_to_core(frame) == message
    raw = msgspec.msgpack.decode(frame)  # plain MessagePack, tagged by the type's name
    assert raw["type"] == type(message).__name__


@pytest.mark.parametrize("message", FROM_CORE, ids=lambda m: type(m).__name__)
def test_messages_from_the_core_round_trip(message):
    codec = Codec()
    frame = codec.encode(message)
    assert codec.decode_from_core(frame) == message
    assert msgspec.msgpack.decode(frame)["type"] == type(message).__name__


def test_sampling_params_are_checked_on_decoding():
    frame = Codec().encode(TO_CORE[0]).replace(b"\xaamax_tokens\x07", b"\xaamax_tokens\x00")
    with pytest.raises(msgspec.ValidationError, match="max_tokens must be at least 1"):
        Codec().decode_to_core(frame)


def test_a_pickle_frame_is_refused_not_loaded():
    for frame in (pickle.dumps(TO_CORE[0]), pickle.dumps(FROM_CORE[1])):
        with pytest.raises(msgspec.DecodeError):
            Codec().decode_to_core(frame)
        with pytest.raises(msgspec.DecodeError):
            Codec().decode_from_core(frame)


def test_deltas_merge_back_into_the_cumulative_outputs():
    steps = [([9], "a", False), ([9, 10], "ab", False), ([9, 10, 11], "ab c", False),
             ([9, 10, 11, 12], "ab cd", True)]
    maker, merger, codec = DeltaMaker(), OutputMerger("a prompt", [3, 4, 5]), Codec()
    sizes = []
    for tokens, text, finished in steps:
        expected = _output(tokens, text, finished)
        delta = maker.delta(_output(tokens, text, finished))
        assert delta.outputs[0].token_ids == tokens[-1:]  # only what is new crosses
        frame = codec.encode(Outputs([delta], [], STATS, 15))
        sizes.append(len(frame))
        crossed = codec.decode_from_core(frame).outputs[0]
        assert merger.merge(crossed) == expected
    assert sizes[-1] < sizes[0] + 40, sizes  # no growth with the tokens so far
    assert maker._sent == {}  # the finished request is forgotten
