"""`pagedllm chat`: an interactive conversation in the terminal, answers streamed as they decode."""

from __future__ import annotations

import sys

from pagedllm.config import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


def run_chat(engine_args: EngineArgs, params: SamplingParams, system_prompt: str | None) -> int:
    """Read user turns from stdin until EOF or /exit; stream each answer to stdout."""
    engine = LLMEngine.from_engine_args(engine_args)
    tokenizer = engine.get_tokenizer()
    params = params.clone(output_kind=RequestOutputKind.DELTA)
    messages: list[dict[str, str]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        request_id = f"chat-{turn}"
        turn += 1
        engine.add_request(request_id, {"prompt": text, "prompt_token_ids": ids}, params)
        answer = []
        while engine.has_unfinished_requests():
            for output in engine.step():
                piece = output.outputs[0].text
                answer.append(piece)
                print(piece, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(answer)})
