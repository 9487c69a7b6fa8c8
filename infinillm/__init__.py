"""infinillm: LLM serving with a KV cache pooled across instances (DistAttention, DistKV)."""

from infinillm.types import CompletionOutput, RequestOutput, SamplingParams, TokenLogprobs

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "TokenLogprobs",
           "__version__"]


def __getattr__(name: str):
    # The engine pulls in torch; import it on first use so `import infinillm` stays cheap.
    if name == "LLM":
        from infinillm.engine import LLM

        return LLM
    raise AttributeError(name)
