"""EngineCoreClient: starts the engine-core process and talks to it from the front-end process.

Two one-way pipes carry pickled messages. Sends go through a writer thread, so a full pipe (the
core busy in a long step) never blocks the caller's event loop; a reader thread receives the
core's messages and hands each one to a callback. The reader also watches the process itself:
if the core dies, the callback gets an EngineCoreFailure naming its exit code.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import queue
import threading
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any, Union

from pagedllm.config import EngineConfig
from pagedllm.engine.core_proc import (
    EngineCoreFailure,
    EngineCoreOutputs,
    EngineCoreReady,
    EngineCoreRequestType,
    run_engine_core,
)
from pagedllm.request import Request

logger = logging.getLogger(__name__)

EngineCoreMessage = Union[EngineCoreOutputs, EngineCoreFailure]


class EngineDeadError(RuntimeError):
    """The engine-core process is gone; no request can run any more."""


class EngineCoreClient:
    """The front end's handle on an engine core running in a child process (spawned)."""

    def __init__(self, config: EngineConfig, log_level: int = logging.WARNING) -> None:
        ctx = multiprocessing.get_context("spawn")
        input_recv, self._input_send = ctx.Pipe(duplex=False)
        self._output_recv, output_send = ctx.Pipe(duplex=False)
        # Not a daemon: a daemonic process may not start children, and with tensor parallelism the
        # core starts one worker process per rank. atexit stops it if the front end never does.
        self.process = ctx.Process(target=run_engine_core, args=(config, input_recv, output_send, log_level),
                                   name="EngineCore", daemon=False)
        self.process.start()
        atexit.register(self.shutdown)
        # Our copies of the child's ends must go, or EOF would never show that the child died.
        input_recv.close()
        output_send.close()
        self._send_queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="EngineCoreWriter", daemon=True)
        self._writer.start()
        self._reader: threading.Thread | None = None
        self._closing = False  # set by shutdown(): the core's exit is then expected, not a failure
        self.ready: EngineCoreReady | None = None

    # ---- start-up ------------------------------------------------------------------------------

    def wait_until_ready(self, timeout: float | None = None) -> EngineCoreReady:
        """Block until the core reports its KV pool; raises EngineDeadError if it fails to start."""
        conn, sentinel = self._output_recv, self.process.sentinel
        ready = wait([conn, sentinel], timeout)
        if not ready:
            raise EngineDeadError(f"The engine core did not start within {timeout} s.")
        if conn in ready:
            try:
                message = conn.recv()
            except EOFError:
                message = None
            if isinstance(message, EngineCoreReady):
                self.ready = message
                return message
            if isinstance(message, EngineCoreFailure):
                raise EngineDeadError(message.message)
        self.process.join(timeout=5)
        raise EngineDeadError(f"The engine core process exited during start-up (exit code {self.process.exitcode}).")

    def start_output_thread(self, on_message: Callable[[EngineCoreMessage], None]) -> None:
        """Deliver every later message of the core to `on_message` (called on the reader thread)."""
        if self._reader is not None:
            raise RuntimeError("The engine-core output thread is already running.")
        self._reader = threading.Thread(target=self._read_loop, args=(on_message,), name="EngineCoreReader",
                                        daemon=True)
        self._reader.start()

    # ---- requests ------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request in the core."""
        self._send_queue.put((EngineCoreRequestType.ADD, request))

    def abort_requests(self, request_ids: list[str]) -> None:
        """Finish these core requests as aborted; their blocks are freed before the core's next step."""
        if request_ids:
            self._send_queue.put((EngineCoreRequestType.ABORT, list(request_ids)))

    def finish_requests_stopped(self, request_ids: list[str]) -> None:
        """Finish core requests that hit a stop string (found by the front end's detokenizer)."""
        if request_ids:
            self._send_queue.put((EngineCoreRequestType.FINISH_STOPPED, list(request_ids)))

    def is_alive(self) -> bool:
        """True while the core process runs."""
        return self.process.is_alive()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the core to stop, then make sure it has (terminate, kill); safe to call twice."""
        atexit.unregister(self.shutdown)
        self._closing = True
        if self.process.is_alive():
            self._send_queue.put((EngineCoreRequestType.SHUTDOWN, None))
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._send_queue.put(None)  # stops the writer thread

    # ---- threads -------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            message = self._send_queue.get()
            if message is None:
                return
            try:
                self._input_send.send(message)
            except OSError:
                return  # the core is gone; the reader reports it

    def _read_loop(self, on_message: Callable[[EngineCoreMessage], None]) -> None:
        conn, sentinel = self._output_recv, self.process.sentinel
        while True:
            ready = wait([conn, sentinel])
            # Read everything the core sent before it exited, then report the exit.
            if conn in ready:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    message = None
                if message is not None:
                    on_message(message)
                    if isinstance(message, EngineCoreFailure):
                        return
                    continue
            self.process.join(timeout=5)
            if self._closing:
                return
            code = self.process.exitcode
            on_message(EngineCoreFailure(f"The engine core process exited unexpectedly (exit code {code})."))
            return
