"""The server's life: loading -> ready -> draining (SIGTERM) -> exit, or dead when the engine dies.

- Loading: the HTTP server listens at once while the engine core loads the model in the
  background; /health is 200 (the process is alive), /ready is 503 and requests get 503.
- Ready: requests are served; the ones in flight are counted.
- Draining (SIGTERM or Ctrl-C): /ready turns 503 and new requests get 503 with
  `Connection: close`, while the requests in flight run to their end, for at most
  --shutdown-timeout seconds; those still running then are aborted (their clients get an
  error), and the process exits with status 0. A second signal exits at once.
- Dead (the engine-core process died, or failed to load): /health, /ready and requests get
  503; pending requests have already failed with the reason; after ENGINE_DEAD_EXIT_DELAY_S
  (so that probes see it) the process exits with status 1 instead of serving errors forever.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

import uvicorn

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.core_client import EngineDeadError
from pagedllm.entrypoints.openai.serving_engine import OpenAIError

logger = logging.getLogger("pagedllm.entrypoints.openai.lifecycle")

# How long a server whose engine died keeps answering 503 before it exits.
ENGINE_DEAD_EXIT_DELAY_S = 5.0
# After the drain deadline, how long aborted requests get to send their error to the client.
_ABORT_GRACE_S = 5.0
_POLL_S = 0.05


class ServerPhase(enum.Enum):
    """Where the server is in its life (what /ready reports)."""

    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


class ServerLifecycle:
    """Phase, in-flight count, background model loading, the SIGTERM drain and the exit status.

    Everything but `load_in_background`'s worker thread runs on the server's event loop.
    """

    def __init__(self, shutdown_timeout: float) -> None:
        self.shutdown_timeout = shutdown_timeout
        self.phase = ServerPhase.LOADING
        self.engine: AsyncLLM | None = None
        self.exit_code = 0
        self.num_in_flight = 0
        self.dead_reason: str | None = None
        self.server: uvicorn.Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._on_ready: Callable[[AsyncLLM], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- requests -------------------------------------------------------------------------------

    def refusal(self) -> OpenAIError | None:
        """The 503 a new request gets in this phase, or None when requests are served."""
        if self.phase == ServerPhase.READY:
            return None
        if self.phase == ServerPhase.LOADING:
            return OpenAIError("The server is still loading the model. Retry later.", 503, code="loading",
                               headers={"Retry-After": "5"})
        if self.phase == ServerPhase.DRAINING:
            return OpenAIError("The server is shutting down and accepts no new requests.", 503,
                               code="server_shutting_down", headers={"Connection": "close"})
        return OpenAIError(f"The engine is dead: {self.dead_reason}", 503, code="engine_dead")

    def request_started(self) -> None:
        """A request passed the gate."""
        self.num_in_flight += 1

    def request_finished(self) -> None:
        """A request's response is complete (or its client left)."""
        self.num_in_flight -= 1

    @property
    def is_alive(self) -> bool:
        """Liveness: False once the engine core is dead (or failed to load)."""
        if self.phase == ServerPhase.DEAD:
            return False
        return self.engine is None or self.engine.is_running

    # ---- loading --------------------------------------------------------------------------------

    def load_in_background(self, create_engine: Callable[[], AsyncLLM], on_ready: Callable[[AsyncLLM], None]) -> None:
        """Build the engine on a worker thread; `on_ready(engine)` then runs on the event loop.

        Called from the app's startup, so the server answers probes while the model loads.
        """
        self.loop = asyncio.get_running_loop()
        self._on_ready = on_ready
        loop = self.loop

        def load() -> None:
            try:
                engine = create_engine()
            except BaseException as e:  # reported on the loop; the thread just ends
                loop.call_soon_threadsafe(self._load_failed, e)
                return
            loop.call_soon_threadsafe(self._loaded, engine)

        # A daemon thread: a SIGTERM during loading must not wait for the load to finish.
        threading.Thread(target=load, name="EngineLoader", daemon=True).start()

    def _loaded(self, engine: AsyncLLM) -> None:
        if self.phase != ServerPhase.LOADING:  # told to stop while loading
            engine.shutdown()
            return
        self.engine = engine
        engine.start()
        engine.on_dead = self._engine_died
        assert self._on_ready is not None
        self._on_ready(engine)
        if not engine.is_running:
            self._engine_died(EngineDeadError("The engine core process exited right after loading."))
            return
        self.phase = ServerPhase.READY
        logger.info("The server is ready.")

    def _load_failed(self, error: BaseException) -> None:
        logger.error("The engine failed to load: %s", error)
        self.dead_reason = f"the engine failed to load: {type(error).__name__}"
        self.phase = ServerPhase.DEAD
        self.exit_code = 1
        self.request_exit()

    # ---- engine death ---------------------------------------------------------------------------

    def _engine_died(self, error: EngineDeadError) -> None:
        if self.phase == ServerPhase.DEAD:
            return
        self.dead_reason = str(error)
        self.phase = ServerPhase.DEAD
        self.exit_code = 1
        logger.error("The engine core died; the server exits in %.0f s.", ENGINE_DEAD_EXIT_DELAY_S)
        assert self.loop is not None
        self.loop.call_later(ENGINE_DEAD_EXIT_DELAY_S, self.request_exit)

    # ---- draining -------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """SIGTERM: stop admitting requests, let those in flight finish, then exit (status 0)."""
        if self.phase in (ServerPhase.DRAINING, ServerPhase.DEAD):
            if self.phase == ServerPhase.DEAD:
                self.request_exit()
            return
        was_loading = self.phase == ServerPhase.LOADING
        self.phase = ServerPhase.DRAINING
        if was_loading:
            self.request_exit()
            return
        logger.info("Draining: %d request(s) in flight, waiting up to %g s (--shutdown-timeout).",
                    self.num_in_flight, self.shutdown_timeout)
        task = asyncio.get_running_loop().create_task(self._drain())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        while self.num_in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(_POLL_S)
        if self.num_in_flight > 0 and self.engine is not None:
            error = OpenAIError(f"The server shut down before the request finished (--shutdown-timeout "
                                f"{self.shutdown_timeout:g} s).", 503, code="server_shutting_down")
            num_aborted = self.engine.abort_all(error)
            logger.warning("Shutdown timeout reached: aborted %d request(s).", num_aborted)
            grace = loop.time() + _ABORT_GRACE_S
            while self.num_in_flight > 0 and loop.time() < grace:
                await asyncio.sleep(_POLL_S)
        logger.info("Drained; shutting down.")
        self.request_exit()

    def request_exit(self) -> None:
        """Tell uvicorn to stop (it then closes connections and runs the app's shutdown)."""
        if self.server is not None:
            self.server.should_exit = True


class GracefulServer(uvicorn.Server):
    """uvicorn, with SIGTERM / SIGINT starting the lifecycle's drain instead of stopping at once.

    uvicorn would re-raise the signal after its own shutdown, ending the process with -SIGTERM;
    here the exit status is the lifecycle's (0 after a drain). A second signal exits at once.
    """

    def __init__(self, config: uvicorn.Config, lifecycle: ServerLifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        lifecycle.server = self
        self._signalled = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler (main thread, which runs the event loop)."""
        loop = self.lifecycle.loop
        if self._signalled or loop is None:
            self.should_exit = True
            self.force_exit = self._signalled and sig == signal.SIGINT
            return
        self._signalled = True
        loop.call_soon_threadsafe(self.lifecycle.begin_drain)
