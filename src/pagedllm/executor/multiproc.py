"""The multiprocess executor: one worker process per rank (tensor x pipeline) on this machine.

Every rank runs in its own spawned process (none in the engine's process: a rank blocked in a
collective whose peer died must never block the engine). Each step the scheduler output is
pickled once and the same bytes go down every rank's pipe; the scheduler output is already a
delta (new requests in full, running ones as new block ids and a token count), so the message
stays small. Only the output rank (rank 0, or the first rank of the last pipeline stage) answers
a step; any other rank speaks only to report an error.

A dead rank is seen through its process sentinel while the engine waits for a reply, so a crash
turns into a WorkerDiedError naming the rank instead of a hang.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import socket
import traceback
from multiprocessing.connection import Connection, wait

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.distributed import host_store
from pagedllm.executor.abstract import Executor, StepFuture, WorkerDiedError
from pagedllm.worker.runner_output import ModelRunnerOutput

logger = logging.getLogger(__name__)

_SHUTDOWN = "shutdown"
_STARTED = "started"  # a worker's first message: its own code runs (the main module imported)


def get_open_port() -> int:
    """A free TCP port on this machine (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker_process(config: EngineConfig, rank: int, init_method: str, conn: Connection, log_level: int) -> None:
    """A worker process: build this rank's Worker, then serve (method, args) calls until shutdown."""
    conn.send((_STARTED, None))
    logging.basicConfig(level=log_level, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    # Ctrl-C and a SIGTERM to the whole process group are the engine's to handle (the server drains
    # first); a worker stops when told to, or when its pipe to the engine closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # NCCL's heartbeat monitor polls the group's store and floods the log once it is gone;
    # dead peers are the executor's to detect.
    os.environ.setdefault("TORCH_NCCL_ENABLE_MONITORING", "0")
    import torch

    from pagedllm.worker.worker import Worker

    world_size = config.parallel_config.world_size
    if config.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        worker = Worker(config, rank=rank, local_rank=rank, distributed_init_method=init_method)
        worker.load_model()
    except BaseException:  # noqa: BLE001 - reported to the engine, which names the rank
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    replies = _StepReplies(conn, rank == config.parallel_config.output_rank, worker.device)
    while True:
        try:
            with torch.profiler.record_function("wait_for_message"):
                message = conn.recv_bytes()
            method, args = pickle.loads(message)
        except (EOFError, OSError):
            break  # the engine is gone
        if method == _SHUTDOWN:
            break
        try:
            if method == "execute_model":
                # Launch and go back to the pipe: the next step is prepared while this one runs.
                replies.add(worker.execute_model_async(*args))
                continue
            replies.drain()  # answers leave in the order the calls came
            result = getattr(worker, method)(*args)
        except BaseException:  # noqa: BLE001
            replies.send(("error", traceback.format_exc()))
            break
        replies.send(("ok", result))
    replies.close()
    worker.shutdown()


class _StepReplies:
    """A worker's thread that waits for each launched step's tokens, in order, and (the output
    rank) sends them to the engine; every rank resolves its own placeholders this way."""

    def __init__(self, conn: Connection, answers_steps: bool, device: object) -> None:
        import queue
        import threading

        self.conn, self.answers_steps, self.device = conn, answers_steps, device
        self._lock = threading.Lock()
        self._pending: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="step-replies", daemon=True)
        self._thread.start()

    def add(self, future: object) -> None:
        """Queue a launched step; its output is sent once its tokens are on the host."""
        self._pending.put(future)

    def send(self, message: tuple[str, object]) -> None:
        """Send a message to the engine (replies to other calls, errors)."""
        with self._lock:
            self.conn.send(message)

    def _run(self) -> None:
        import torch

        if getattr(self.device, "type", None) == "cuda":
            torch.cuda.set_device(self.device)  # type: ignore[arg-type]
        while (future := self._pending.get()) is not None:
            try:
                with torch.profiler.record_function("step_reply"):
                    output = future.result()  # type: ignore[attr-defined]
                    if self.answers_steps:
                        self.send(("ok", output))
            except OSError:
                return  # the engine is gone
            except BaseException:  # noqa: BLE001 - the engine names the rank
                self.send(("error", traceback.format_exc()))
                return
            finally:
                self._pending.task_done()

    def drain(self) -> None:
        """Wait until every queued step's reply has been sent."""
        self._pending.join()

    def close(self) -> None:
        """Finish the queued steps' replies, then stop the thread."""
        self._pending.put(None)
        self._thread.join(timeout=10)


def _join_or_kill(process: multiprocessing.process.BaseProcess) -> None:
    """Wait up to 10 s for a worker process to exit, then kill it."""
    process.join(timeout=10)
    if process.is_alive():
        process.kill()
        process.join(timeout=5)


class MultiprocExecutor(Executor):
    """Tensor / pipeline parallelism on one machine: spawned worker processes, one per rank (device)."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.world_size = config.parallel_config.world_size
        ctx = multiprocessing.get_context("spawn")
        # The group's store lives here, on a port the OS picked, for as long as any rank does.
        self._store = host_store()
        init_method = f"tcp://127.0.0.1:{self._store.port}"
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.conns: list[Connection] = []
        self._closed = False
        self._started: set[int] = set()  # ranks whose own code ran (see _exit_detail)
        self.messages_sent = 0  # control-path counters (per message, not per rank)
        self.bytes_sent = 0
        for rank in range(self.world_size):
            parent_end, child_end = ctx.Pipe(duplex=True)
            process = ctx.Process(target=run_worker_process, name=f"TPWorker-{rank}", daemon=True,
                                  args=(config, rank, init_method, child_end, logging.getLogger().level))
            process.start()
            child_end.close()
            self.processes.append(process)
            self.conns.append(parent_end)
        # What `wait` hands back (a pipe or a process sentinel) -> its rank; fixed for the executor's life.
        self._rank_of_conn = {id(conn): rank for rank, conn in enumerate(self.conns)}
        self._rank_of_sentinel = {process.sentinel: rank for rank, process in enumerate(self.processes)}
        self._receive(range(self.world_size))  # every rank loaded its shard

    def collective_rpc(self, method: str, *args: object) -> list[object]:
        """Call `Worker.<method>` on every rank and wait for all answers."""
        self._send(method, args)
        return self._receive(range(self.world_size))

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Broadcast the step to every rank; the output rank's output comes back."""
        return self.execute_model_async(scheduler_output).result()

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepFuture:
        """Send the step to every rank and return at once: the output rank answers steps in
        order, and the future reads its answer. The next step's message waits in the ranks' pipes."""
        self._send("execute_model", (scheduler_output,))
        return _OutputRankReply(self, self.config.parallel_config.output_rank)

    def check_health(self) -> None:
        """Raise WorkerDiedError for the first rank whose process is gone."""
        for rank, process in enumerate(self.processes):
            if not process.is_alive():
                raise self._failure(rank, self._exit_detail(rank))

    def shutdown(self) -> None:
        """Ask every rank to stop, then make sure each process is gone."""
        if self._closed:
            return
        self._closed = True
        message = pickle.dumps((_SHUTDOWN, ()))
        for conn in self.conns:
            try:
                conn.send_bytes(message)
            except OSError:
                pass
        for process in self.processes:
            _join_or_kill(process)
        for conn in self.conns:
            conn.close()
        self._store = None  # every rank is gone: nobody polls the store any more

    # ---- the pipe protocol -----------------------------------------------------------------------

    def _send(self, method: str, args: tuple[object, ...]) -> None:
        if self._closed:
            raise RuntimeError("The executor has been shut down.")
        message = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        self.messages_sent += 1
        self.bytes_sent += len(message)
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(message)
            except OSError as e:
                raise self._failure(rank, f"its pipe is closed ({e})") from None

    def _receive(self, ranks: range | list[int]) -> list[object]:
        """Wait for one answer from each of `ranks`; any message or exit of any rank that is an
        error (or any rank's process ending) raises WorkerDiedError naming that rank."""
        expected = set(ranks)
        results: dict[int, object] = {}
        while len(results) < len(expected):
            for ready in wait([*self.conns, *self._rank_of_sentinel]):
                if isinstance(ready, int):
                    rank = self._rank_of_sentinel[ready]
                    while self.conns[rank].poll():  # it may have reported why before exiting
                        self._read(rank, expected, results)
                    raise self._failure(rank, self._exit_detail(rank))
                self._read(self._rank_of_conn[id(ready)], expected, results)
        return [results[rank] for rank in sorted(expected)]

    def _read(self, rank: int, expected: set[int], results: dict[int, object]) -> None:
        try:
            status, payload = self.conns[rank].recv()
        except (EOFError, OSError):
            raise self._failure(rank, self._exit_detail(rank)) from None
        if status == _STARTED:
            self._started.add(rank)
            return
        if status == "error":
            # A rank whose peer died fails in its next collective; blame the dead peer if there is one.
            dead = self._first_dead_rank(grace_s=2.0, ignore=rank)
            if dead is not None:
                raise self._failure(dead, f"{self._exit_detail(dead)} (rank {rank} then failed too)")
            raise self._failure(rank, f"\n{payload}")
        if rank not in expected:
            raise self._failure(rank, f"unexpected message {status!r}")
        results[rank] = payload

    def _exit_detail(self, rank: int) -> str:
        """Why `rank`'s process is gone, as far as the engine can tell."""
        process = self.processes[rank]
        process.join(timeout=1)
        detail = f"process {process.pid} exited with code {process.exitcode}"
        if rank not in self._started:
            # The usual cause: a spawned process imports the main module first, and a script that
            # creates its LLM at module level runs that again in every worker.
            detail += (" before the worker's own code ran, while it imported the main module (the worker's "
                       "traceback is in the output above). A script that creates an LLM must do it under "
                       "`if __name__ == \"__main__\":`: every worker process imports the script first.")
        return detail

    def _first_dead_rank(self, grace_s: float, ignore: int) -> int | None:
        """The first rank other than `ignore` whose process has exited or exits within `grace_s`."""
        others = {sentinel: rank for sentinel, rank in self._rank_of_sentinel.items() if rank != ignore}
        if not others:
            return None
        ready = wait(list(others), timeout=grace_s)
        return min((others[s] for s in ready), default=None)  # type: ignore[index]

    def _failure(self, rank: int, detail: str) -> WorkerDiedError:
        """Build the error for a failed rank and stop every other rank (nothing may hang on it)."""
        error = WorkerDiedError(rank, detail)
        logger.error("%s", error)
        self.shutdown_after_failure()
        return error

    def shutdown_after_failure(self) -> None:
        """Kill every worker without waiting: after one rank failed the others may sit in a collective."""
        if self._closed:
            return
        self._closed = True
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join(timeout=5)


class _OutputRankReply:
    """The output rank's answer to one step, read when asked for (answers arrive in step order)."""

    def __init__(self, executor: MultiprocExecutor, rank: int) -> None:
        self.executor = executor
        self.rank = rank
        self._output: ModelRunnerOutput | None = None

    def result(self) -> ModelRunnerOutput:
        """Wait for the output rank's answer (a dead rank raises WorkerDiedError)."""
        if self._output is None:
            self._output = self.executor._receive([self.rank])[0]  # type: ignore[assignment]
        return self._output  # type: ignore[return-value]
