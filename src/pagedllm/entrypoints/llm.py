"""LLM: the offline Python API, shaped like vLLM's (`LLM(model).generate(prompts, params)`)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedllm.config import EngineArgs
from pagedllm.engine.beam_search import BeamSearchInstance
from pagedllm.engine.input_processor import PromptType
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.outputs import BeamSearchOutput, RequestOutput
from pagedllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from pagedllm.tokenizer import Tokenizer

ChatMessages = list[dict[str, Any]]


class LLM:
    """Generate text for batches of prompts with continuous batching over a paged KV cache.

    With no `model`, runs the embedded SmolLM2-135M-Instruct. Keyword arguments are EngineArgs
    fields (max_model_len, max_num_seqs, block_size, kv_cache_memory_bytes, ...).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(EngineArgs.__dataclass_fields__)
        if unknown:
            raise TypeError(f"Unknown engine argument(s): {', '.join(sorted(unknown))}.")
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._request_counter = itertools.count()

    def shutdown(self) -> None:
        """Stop the engine's worker processes now (tensor parallelism); the LLM cannot be used after."""
        self.llm_engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def start_profile(self) -> None:
        """Start the torch profiler in every worker; set PAGEDLLM_TORCH_PROFILER_DIR first."""
        self.llm_engine.start_profile()

    def stop_profile(self) -> list[str]:
        """Stop the profiler; the Chrome trace of each rank (open in Perfetto / chrome://tracing)."""
        return self.llm_engine.stop_profile()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; returns False (and does nothing) while requests are running."""
        return self.llm_engine.reset_prefix_cache()

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer."""
        return self.llm_engine.get_tokenizer()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the order of the prompts.

        A prompt is a string, {"prompt": str}, {"prompt_token_ids": [...]}, or a token-id list
        (a list of token-id lists is a batch).
        """
        prompt_list = self._as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"Got {len(params_list)} sampling_params for {len(prompt_list)} prompts.")
        return self._run(prompt_list, params_list, use_tqdm)

    def chat(
        self,
        messages: ChatMessages | Sequence[ChatMessages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} messages) or a batch of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        prompts: list[PromptType] = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, chat_template=chat_template)
            # The template already holds any BOS token, so none is added again.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search for every prompt; one BeamSearchOutput per prompt, in order.

        Reproduces Hugging Face's `generate(num_beams=beam_width, do_sample=False,
        length_penalty=..., early_stopping=...)`; see engine/beam_search.py. Runs as one
        generate call per step over all live beams of all prompts, which share their
        blocks through the prefix cache.
        """
        engine = self.llm_engine
        max_model_len = engine.config.model_config.max_model_len
        searches: list[BeamSearchInstance] = []
        for prompt in self._as_prompt_list(prompts):
            processed = engine.input_processor.process(prompt, SamplingParams(max_tokens=1))
            searches.append(BeamSearchInstance(processed.prompt_token_ids, params, engine.eos_token_ids,
                                               max_model_len, cache_salt=processed.cache_salt))
        with tqdm(total=params.max_tokens, desc="Beam search steps", disable=not use_tqdm,
                  dynamic_ncols=True) as bar:
            while True:
                active = [search for search in searches if not search.done]
                if not active:
                    break
                step_requests = [r for search in active for r in search.step_requests()]
                outputs = iter(self._run([p for p, _ in step_requests], [sp for _, sp in step_requests],
                                         use_tqdm=False))
                for search in active:
                    search.update_from_outputs([next(outputs) for _ in search.beams])
                bar.update(1)
        return [BeamSearchOutput(search.results(engine.tokenizer)) for search in searches]

    @staticmethod
    def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # a single token-id list
        return prompts

    def _run(self, prompts: list[PromptType], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = [str(next(self._request_counter)) for _ in prompts]
        # Only final outputs are returned, so intermediate RequestOutputs need not be built.
        final_only = RequestOutputKind.FINAL_ONLY
        params = [p if p.output_kind == final_only else p.clone(output_kind=final_only) for p in params]
        added: list[str] = []
        try:
            for request_id, prompt, p in zip(ids, prompts, params):
                engine.add_request(request_id, prompt, p)
                added.append(request_id)
        except Exception:
            engine.abort_request(added)
            raise
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True) as bar:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[i] for i in ids]
