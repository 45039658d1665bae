"""pagedllm: an LLM inference and serving engine built on PagedAttention."""

from pagedllm.outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "EngineArgs",
    "SamplingParams",
    "BeamSearchParams",
    "BeamSearchOutput",
    "BeamSearchSequence",
    "RequestOutputKind",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "__version__",
]


def __getattr__(name: str):
    # Imported lazily so that `import pagedllm` stays cheap (torch loads only when needed).
    if name == "LLM":
        from pagedllm.entrypoints.llm import LLM

        return LLM
    if name == "EngineArgs":
        from pagedllm.config import EngineArgs

        return EngineArgs
    raise AttributeError(f"module 'pagedllm' has no attribute {name!r}")
