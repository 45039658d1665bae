"""The engine-core process: EngineCore (scheduler + model) in a busy loop, fed through pipes.

The server keeps HTTP handling, tokenization and detokenization in its own process so that
none of it ever delays a model step. This process only does: drain incoming messages (new
requests, aborts, stop-string finishes) -> `step()` -> send the step's outputs back, with a
scheduler snapshot for metrics. With nothing to run it blocks on its input pipe instead of
spinning. Messages are pickled dataclasses over `multiprocessing` pipes.
"""

from __future__ import annotations

import enum
import logging
import signal
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler import SchedulerStats
from pagedllm.core.scheduler_output import EngineCoreOutput
from pagedllm.request import RequestStatus

logger = logging.getLogger(__name__)

HEALTH_CHECK_INTERVAL_S = 2.0


class EngineCoreRequestType(enum.Enum):
    """Kinds of messages the front end sends to the engine-core process."""

    ADD = 0  # payload: a Request
    ABORT = 1  # payload: list of engine-core request ids (client gone)
    FINISH_STOPPED = 2  # payload: list of ids that hit a stop string in the detokenizer
    SHUTDOWN = 3  # payload: None


@dataclass
class EngineCoreReady:
    """First message of a healthy core: the KV pool it sized, for the front end to log and use."""

    num_blocks: int
    block_size: int
    max_model_len: int

    @property
    def num_kv_tokens(self) -> int:
        """Tokens the whole KV pool holds."""
        return self.num_blocks * self.block_size

    @property
    def max_concurrency(self) -> float:
        """How many requests of max_model_len tokens fit the pool at once."""
        return self.num_kv_tokens / self.max_model_len


@dataclass
class EngineCoreFailure:
    """Last message of a core that crashed (while starting or stepping): what went wrong."""

    message: str


@dataclass
class EngineCoreOutputs:
    """What one pass of the loop produced, sent back as one message."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    scheduler_stats: SchedulerStats | None = None
    # Requests scheduled for the first time in this pass -> time.monotonic() of that step.
    first_scheduled_times: dict[str, float] = field(default_factory=dict)
    # Requests the scheduler refused -> why (the front end fails them with this message).
    request_errors: dict[str, str] = field(default_factory=dict)


def run_engine_core(config: EngineConfig, input_conn: Connection, output_conn: Connection, log_level: int) -> None:
    """Process entry point: build the EngineCore, report readiness, then serve until shut down.

    Exits when told to, when the front end's end of the input pipe closes (the server died), or
    after reporting an EngineCoreFailure.
    """
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    # Ctrl-C reaches the whole process group; the front end decides when this process stops.
    # So does a SIGTERM sent to the group (systemd, `timeout`): the server drains its requests
    # first and then stops this process itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from pagedllm.engine.engine_core import EngineCore

        engine_core = EngineCore(config)
    except BaseException:
        _send_failure(output_conn, f"The engine core failed to start:\n{traceback.format_exc()}")
        return
    cache = engine_core.config.cache_config
    output_conn.send(EngineCoreReady(cache.num_blocks, cache.block_size, config.scheduler_config.max_model_len))
    try:
        _busy_loop(engine_core, input_conn, output_conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.info("The front end went away; the engine core stops.")
    except BaseException:
        _send_failure(output_conn, f"The engine core crashed:\n{traceback.format_exc()}")
    finally:
        engine_core.shutdown()


def _send_failure(output_conn: Connection, message: str) -> None:
    logger.error("%s", message)
    try:
        output_conn.send(EngineCoreFailure(message))
    except OSError:
        pass  # the front end is gone too


def _busy_loop(engine_core: Any, input_conn: Connection, output_conn: Connection) -> None:
    """Drain inputs -> step -> send outputs, until SHUTDOWN; block on the input pipe while idle."""
    scheduler = engine_core.scheduler
    while True:
        # Idle: sleep until a message (or EOF) arrives, checking now and then that every worker
        # rank is still alive, so that a dead one is reported even when no request comes.
        while not engine_core.has_unfinished_requests() and not input_conn.poll(HEALTH_CHECK_INTERVAL_S):
            engine_core.check_health()
        result = EngineCoreOutputs()
        had_input = False
        while input_conn.poll():
            kind, payload = input_conn.recv()
            had_input = True
            if kind == EngineCoreRequestType.ADD:
                try:
                    engine_core.add_request(payload)
                except ValueError as e:
                    result.request_errors[payload.request_id] = str(e)
            elif kind == EngineCoreRequestType.ABORT:
                engine_core.abort_requests(payload)
            elif kind == EngineCoreRequestType.FINISH_STOPPED:
                engine_core.finish_requests_stopped(payload)
            elif kind == EngineCoreRequestType.SHUTDOWN:
                return
            else:
                raise ValueError(f"Unknown engine-core message type {kind!r}.")
        stepped = False
        if engine_core.has_unfinished_requests():
            # Requests never scheduled before (status WAITING; a preempted one is PREEMPTED):
            # those that leave that state in this step were first scheduled at its start.
            never_scheduled = [r for r in scheduler.waiting if r.status == RequestStatus.WAITING]
            step_start = time.monotonic()
            result.outputs = engine_core.step()
            stepped = True
            for request in never_scheduled:
                if request.status != RequestStatus.WAITING:
                    result.first_scheduled_times[request.request_id] = step_start
        if stepped or had_input:
            result.scheduler_stats = scheduler.make_stats()
            output_conn.send(result)
