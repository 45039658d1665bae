"""Flags of `pagedllm serve`: server options plus every engine flag."""

from __future__ import annotations

import argparse

from pagedllm.config import EngineArgs


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the server's flags and EngineArgs' flags to `parser`."""
    parser.add_argument("model_tag", nargs="?", default=None,
                        help="HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1/* (default: env PAGEDLLM_API_KEY)")
    group.add_argument("--served-model-name", nargs="+", default=None,
                       help="model name(s) clients use; the first one appears in responses")
    group.add_argument("--chat-template", default=None, help="Jinja chat template, or a file holding one")
    group.add_argument("--max-logprobs", type=int, default=20, help="largest logprobs / top_logprobs accepted")
    group.add_argument("--disable-access-log", action="store_true", help="do not log every HTTP request")
    group.add_argument("--log-requests", action="store_true",
                       help="log every request's prompt and parameters (off: prompts never reach the log)")
    group.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                       help="enable CORS for these origins ('*' for any); CORS is off without it")
    group.add_argument("--trust-request-chat-template", action="store_true",
                       help="accept a chat_template in requests (off: a request's template is refused)")
    limits = parser.add_argument_group("reliability")
    limits.add_argument("--max-waiting-requests", type=int, default=1024,
                        help="sequences that may wait beyond the running batch (--max-num-seqs); more get 503 "
                             "with Retry-After")
    limits.add_argument("--max-request-body-bytes", type=int, default=4 * 1024 * 1024,
                        help="larger request bodies get 413")
    limits.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                        help="abort a request (and free its blocks) this long after it arrived: 504 (default: none)")
    limits.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long requests in flight may run before they are aborted")
    EngineArgs.add_cli_args(parser)
    return parser


def resolve_model_arg(args: argparse.Namespace) -> None:
    """Fold the positional model into --model (giving two different ones is an error)."""
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"Two models were given: {args.model_tag!r} (positional) and {args.model!r} (--model).")
        args.model = args.model_tag
