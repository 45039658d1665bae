"""LLMEngine: the synchronous front of the engine — tokenize, run the core, build outputs."""

from __future__ import annotations

import logging
import time

from pagedllm.config import EngineArgs, EngineConfig, create_engine_config
from pagedllm.engine.engine_core import EngineCore
from pagedllm.engine.input_processor import InputProcessor, PromptType
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.request_fanout import make_engine_core_requests, model_eos_token_ids
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.tokenizer import Tokenizer, get_tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    """Adds requests, steps the engine core, and turns its outputs into RequestOutputs."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        model_config = config.model_config
        self.tokenizer: Tokenizer | None = get_tokenizer(model_config.tokenizer) if model_config.tokenizer else None
        self.eos_token_ids = model_eos_token_ids(model_config, self.tokenizer)
        self.input_processor = InputProcessor(self.tokenizer, model_config.max_model_len, model_config.vocab_size)
        self.engine_core = EngineCore(config)
        self.output_processor = OutputProcessor(self.tokenizer)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "LLMEngine":
        """Build an engine from user-facing arguments."""
        return cls(create_engine_config(engine_args))

    def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams, arrival_time: float | None = None
    ) -> None:
        """Validate and queue one request (fanned out into children when n > 1)."""
        processed = self.input_processor.process(prompt, params)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        requests = make_engine_core_requests(request_id, processed, params, arrival_time, self.eos_token_ids,
                                             self.config.model_config.max_model_len, self.output_processor)
        for request in requests:
            self.engine_core.add_request(request)

    def abort_request(self, request_ids: list[str]) -> None:
        """Stop requests (by their ids, or their parent's id) and free their blocks."""
        ids = self.output_processor.abort_requests(request_ids)
        self.engine_core.abort_requests(ids)

    def shutdown(self) -> None:
        """Stop the engine core's workers (also done when the engine is garbage-collected)."""
        self.engine_core.shutdown()

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the outputs ready for users."""
        core_outputs = self.engine_core.step()
        processed = self.output_processor.process_outputs(core_outputs)
        if processed.reqs_to_abort:
            self.engine_core.finish_requests_stopped(processed.reqs_to_abort)
        return processed.request_outputs

    def start_profile(self) -> None:
        """Start the torch profiler in every worker (traces go to PAGEDLLM_TORCH_PROFILER_DIR)."""
        self.engine_core.start_profile()

    def stop_profile(self) -> list[str]:
        """Stop the profiler; the Chrome trace written by each rank, in rank order."""
        return self.engine_core.stop_profile()

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache (e.g. between benchmark passes); False while requests run."""
        return self.engine_core.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        """True while any request is queued, running, or has outputs not yet returned."""
        return self.engine_core.has_unfinished_requests() or self.output_processor.has_unfinished_requests()

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer; an error if it was loaded without one."""
        if self.tokenizer is None:
            raise ValueError("This engine has no tokenizer (a dummy model without a tokenizer directory).")
        return self.tokenizer
