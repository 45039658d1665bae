"""One-token decode GEMV in CUDA C++ (`cuda_gemv.cu`): bulk-copy weight streaming on sm_90+.

At batch 1 a decoder layer's linears are weight streams, and on an H200 the Triton skinny GEMM
(`triton_gemv.py`) lost a good part of its time to the fixed costs around each stream rather
than to the stream itself. This kernel streams whole weight rows into shared memory with the
Hopper copy engine (`cp.async.bulk`), is launched with programmatic dependent launch (its weight
stream needs nothing the previous kernel writes), keeps the stream short until its input operand
is loaded (an SM's loads queue behind its outstanding bulk copies), and hands the last chunks of
rows out through a ticket counter so that no SM finishes long after the others. It serves M = 1,
bf16, in three forms: plain, gated input (SiLU(gate) * up, the down projection) and residual add
+ RMSNorm folded in (the QKV and gate_up projections), with the Triton kernels' roundings.

It is one more candidate of the skinny-GEMM tuner (`triton_gemv.tuned_config`), taken untimed
for weights of 16 MiB and more (`preferred`: the tuner times each kernel alone and so misses what
the kernel gains after another of its kind) and where it measures faster for smaller ones;
`PAGEDLLM_PREFER_CUDA_GEMV=1` takes it wherever it serves, `=0` leaves every choice to the tuner.
At one token on two GPUs it also carries the all-reduce between a row-parallel GEMV and the add
+ RMSNorm GEMV after it (`Exchange`; `PAGEDLLM_GEMV_ALL_REDUCE=0` turns that off; the GEMV that
sums the rows trusts their tags, `PAGEDLLM_GEMV_PULL_WAIT=1` makes it also wait for the writer
grid). Built on first use with torch's C++ extension loader (needs nvcc; cached under
~/.cache/torch_extensions); when the build fails, or with `PAGEDLLM_DISABLE_CUDA_GEMV=1`, the
tuner never offers it. CUDA-graph capturable, no host syncs.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from pagedllm.cuda_extension import load_extension
from pagedllm.envs import off_by_default, on_by_default

DISABLE_ENV_VAR = "PAGEDLLM_DISABLE_CUDA_GEMV"
# Skip the timing and take this kernel wherever it serves: the tuner times each kernel alone, which
# misses what it gains from following another of its kind (its weight stream starts while the
# previous GEMV drains: programmatic dependent launch).
PREFER_ENV_VAR = "PAGEDLLM_PREFER_CUDA_GEMV"
PREFER_MIN_BYTES = 16 << 20  # see preferred()
_SOURCE = Path(__file__).with_name("cuda_gemv.cu")
_HEADERS = (Path(__file__).with_name("cuda_gemv_device.cuh"),)  # included by _SOURCE
_MAX_RING_BYTES = 192 * 1024  # the stage ring; + the operand and barriers stays under 227 KB
_STAGE_BYTES = 32 * 1024  # one bulk copy: whole rows, about this many bytes
_MAX_ROWS_PER_STAGE = 16
_MAX_SLOTS = 32
_OPERAND_OFFSET = 1024  # cuda_gemv.cu's kOperandOffset
_SMEM_LIMIT = 227 * 1024
# Rows handed out through tickets: the last ~20% of the chunks (the static slabs stream with
# no coordination; the tail evens out the SMs that stream slower).
DYNAMIC_FRACTION = 0.2
AHEAD = 2  # stages in flight before the operand is loaded (cuda_gemv.cu)
# A pulled operand takes several round trips (the rows' tags, maybe polls of late ones), and
# each queues behind this SM's bulk copies in flight: one stage ahead, not two, got it in 1-1.5
# us sooner on 2 x H200 (L1 TP=2 -18 us a step; at TP=1 one stage ahead was slower for the plain
# operand). docs/benchmarks.md, sixteenth session.
AHEAD_PULL = 1
PDL = True
MODES = {"plain": 0, "silu": 1, "add_rmsnorm": 2}
STAGE_STAMPS = 16  # stages stamped per CTA (cuda_gemv.cu's kStageStamps)
STAGE_WORDS = 8  # int64 words a stamped stage takes (cuda_gemv.cu's kStageWords)


def enabled_by_env() -> bool:
    """False when PAGEDLLM_DISABLE_CUDA_GEMV is set to anything but '', '0' or 'false'."""
    return not off_by_default(DISABLE_ENV_VAR)


@functools.cache
def _module() -> ModuleType | None:
    """The compiled extension, or None when it cannot be built here."""
    return load_extension("pagedllm_cuda_gemv", _SOURCE, "CUDA GEMV kernel", _HEADERS)


def supports(x: torch.Tensor, weight: torch.Tensor, mode: str) -> bool:
    """Whether the kernel can serve x [1, K(*2 gated)] times weight [N, K] in `mode` here
    (without building it: see `available`)."""
    if not (x.is_cuda and enabled_by_env() and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:  # cp.async.bulk is sm_90+
        return False
    n, k = weight.shape
    max_k = 8192 if mode == "add_rmsnorm" else 16384
    return x.shape[0] == 1 and k % 8 == 0 and k <= max_k and n > 0 and plan(n, k) is not None


def preferred(weight: torch.Tensor) -> bool:
    """Whether to take this kernel for `weight` without timing it against the others.

    PAGEDLLM_PREFER_CUDA_GEMV=1: always; =0: never (the tuner decides). Unset: for weights of at
    least PREFER_MIN_BYTES, the sizes at which chains of this kernel were measured faster than
    the Triton kernels for every Llama-3.1-8B shape at TP=1 and TP=2 on an H200 (the tuner,
    timing each kernel alone, kept Triton for some of them and the step was slower).
    """
    value = os.environ.get(PREFER_ENV_VAR, "").strip().lower()
    if value in ("0", "false"):
        return False
    if value:
        return True
    return weight.numel() * weight.element_size() >= PREFER_MIN_BYTES


def aligned(*tensors: torch.Tensor | None) -> bool:
    """Whether every tensor given starts on a 16-byte boundary (the kernel's vector loads)."""
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def available() -> bool:
    """Whether the extension is built (building it on the first call)."""
    return enabled_by_env() and _module() is not None


@dataclass(frozen=True)
class GemvPlan:
    """How one weight shape is streamed."""

    rows_per_stage: int
    num_slots: int
    static_chunks: int  # per CTA, before the ticketed tail
    n: int
    k: int


def plan(n: int, k: int, sms: int = 132) -> GemvPlan | None:
    """The stage size, ring depth and static split for weight [n, k], or None if a row does not
    fit the shared memory."""
    row_bytes = 2 * k
    rows = max(1, min(_MAX_ROWS_PER_STAGE, _STAGE_BYTES // row_bytes))
    stage_bytes = rows * row_bytes
    ring_offset = (_OPERAND_OFFSET + row_bytes + 127) // 128 * 128
    slots = min(_MAX_SLOTS, _MAX_RING_BYTES // stage_bytes, (_SMEM_LIMIT - ring_offset) // stage_bytes)
    if slots < 2:
        return None
    chunks = -(-n // rows)
    static = int(chunks * (1 - DYNAMIC_FRACTION)) // sms
    return GemvPlan(rows, slots, static, n, k)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# (device index, weight data pointer, plan) -> the weight's ticket counter. A launch draws exactly
# one period of tickets (cuda_gemv.cu), so a counter serves one plan only.
_tickets: dict[tuple[int, int, GemvPlan], torch.Tensor] = {}


def _ticket_counter(weight: torch.Tensor, p: GemvPlan) -> torch.Tensor:
    key = (weight.device.index or 0, weight.data_ptr(), p)
    counter = _tickets.get(key)
    if counter is None:
        counter = torch.zeros(1, dtype=torch.int64, device=weight.device)
        _tickets[key] = counter
    return counter


@dataclass(frozen=True)
class Exchange:
    """One all-reduce site carried by the GEMVs on either side of it (one token): the
    row-parallel GEMV before it stores each output row into every rank's buffer as a tagged word,
    the add + RMSNorm GEMV after it takes the words by their tags (polling any not in yet) and
    sums the ranks' rows in rank order, as the one-shot all-reduce would (the same bits),
    with no kernel of its own (cuda_gemv.cu explains the buffer). Made by
    `SymmMemAllReduce.exchanges`."""

    buffer: torch.Tensor  # this rank's buffer, in symmetric memory (exchange_buffer_bytes, zeroed)
    addresses: tuple[int, ...]  # the buffers the writer stores into: every rank's, as mapped here
    epoch: torch.Tensor  # int64 [1] on this device: the reader CTAs that took the site's operand (calls x SMs)
    rank: int
    world: int


LOCAL_HANDOFF_ENV_VAR = "PAGEDLLM_GEMV_LOCAL_HANDOFF"


def local_handoff_enabled() -> bool:
    """Whether one GPU hands rows over by their tags (`local_exchanges`): PAGEDLLM_GEMV_LOCAL_HANDOFF=1.
    Off by default: L1 at TP=1 on an H200 took 3.933 ms with it against 3.849 without
    (docs/benchmarks.md, twenty-third session); kept to measure what the tagged hand-off costs
    over the plain one, which the all-reduce sites of two GPUs pay too."""
    return off_by_default(LOCAL_HANDOFF_ENV_VAR)


def local_exchanges(sizes: list[int], device: torch.device) -> list[Exchange]:
    """Sites of `sizes` elements each for one GPU (world 1), in its own memory: no all-reduce to
    carry, only the hand-off. The add + RMSNorm GEMV then takes the row-parallel GEMV's rows by
    their tags as they land instead of waiting for that grid to complete (`griddepcontrol.wait`
    and the memory flush after it), as the pulled operand of two ranks does; the sum of one
    rank's rows is those rows, so the output is bitwise the plain hand-off's. Made at model
    load (linear.prepare_gemv_all_reduce)."""
    exchanges = []
    for n in sizes:
        buffer = torch.zeros(exchange_buffer_bytes(1, n) // 8, dtype=torch.int64, device=device)
        epoch = torch.zeros(1, dtype=torch.int64, device=device)
        exchanges.append(Exchange(buffer, (buffer.data_ptr(),), epoch, 0, 1))
    return exchanges


def exchange_buffer_bytes(world: int, n: int) -> int:
    """Bytes of one rank's buffer of a site of `n` elements: the ranks' rows as 4-byte tagged
    words, then a count each (written only with PAGEDLLM_GEMV_PULL_POLL=0)."""
    return world * (4 * n + 8)


def gemv(mode: str, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None, bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
         residual_out: torch.Tensor | None = None, stamps: torch.Tensor | None = None,
         push: Exchange | None = None, pull: Exchange | None = None,
         stage_stamps: torch.Tensor | None = None) -> torch.Tensor | None:
    """out [1, N] = the `mode` product of x and weight [N, K] (see the module docstring).

    "plain": x [1, K]; "silu": x [1, 2K] = [gate | up]; "add_rmsnorm": x is the hidden state
    [1, K], `residual`, `norm_weight` [K] and `eps` the norm's, and `residual_out` [1, K]
    receives hidden + residual. Every tensor contiguous bf16 on one device; the caller checked
    `supports`. `stamps` (tests and benchmarks): per-CTA global-timer readings; `stage_stamps`
    (int64, >= SMs x STAGE_STAMPS x STAGE_WORDS): per CTA and stage, when it was issued, when
    warp 0 had its bytes and its rows done, its chunk, and warp 0's SM clocks (cuda_gemv.cu).

    `push` ("plain" / "silu", no bias): the rows go to every rank's buffer of the site instead of
    `out` (None). `pull` ("add_rmsnorm"): the hidden state is the sum of the ranks' rows in the
    site's buffer, and `x` is ignored (see Exchange).
    """
    module = _module()
    if module is None:
        raise RuntimeError("the CUDA GEMV kernel is not built (see the log)")
    n, k = weight.shape
    sms = _num_sms(weight.device.index or 0)
    p = plan(n, k, sms)
    assert p is not None
    site = push or pull
    module.gemv_m1(MODES[mode], weight, x, residual, norm_weight, bias, x if out is None else out, residual_out,
                   _ticket_counter(weight, p), eps, p.rows_per_stage, p.num_slots, sms, p.static_chunks,
                   AHEAD_PULL if pull else AHEAD, PDL,
                   stamps, list(push.addresses) if push else [], pull.buffer if pull else None,
                   site.epoch if site else None, site.rank if site else 0, site.world if site else 1,
                   pull is not None and pull_waits_for_writer(), site is not None and pull_polls(), stage_stamps)
    return out


EXCHANGE_ENV_VAR = "PAGEDLLM_GEMV_ALL_REDUCE"
PULL_WAIT_ENV_VAR = "PAGEDLLM_GEMV_PULL_WAIT"


PULL_POLL_ENV_VAR = "PAGEDLLM_GEMV_PULL_POLL"


def pull_polls() -> bool:
    """Whether a pulled operand's threads with stale words poll just those words and the
    writers count no rows (the default), or, with PAGEDLLM_GEMV_PULL_POLL=0, the writers count
    their rows and one reader thread waits for every count first (cuda_gemv.cu). On by default:
    L1 at TP=2 on 2 x H200 took 6-18 us a step less with it, in three calls (docs/benchmarks.md,
    twenty-third session). Both GEMVs of a site must agree: it is read at every call, so set it
    before the engine starts."""
    return on_by_default(PULL_POLL_ENV_VAR)


def pull_waits_for_writer() -> bool:
    """Whether a pulled operand's consumers also wait for the writer grid to complete
    (griddepcontrol.wait) before loading it: PAGEDLLM_GEMV_PULL_WAIT=1. Off by default: the
    rows' tags already vouch for them (cuda_gemv.cu)."""
    return off_by_default(PULL_WAIT_ENV_VAR)


MAX_PULL_WORLD = 2  # ranks a pulled operand sums (cuda_gemv.cu's kMaxPullWorld)


def exchange_enabled_by_env() -> bool:
    """False when PAGEDLLM_GEMV_ALL_REDUCE is '0' or 'false' (on by default: L1 at TP=2 on
    2 x H200 took 2.589 ms with it, 2.697 without; docs/benchmarks.md, fifteenth session)."""
    return on_by_default(EXCHANGE_ENV_VAR)


def can_exchange(sample: torch.Tensor, writer: torch.Tensor, writer_mode: str, reader: torch.Tensor,
                 world: int, *reader_inputs: torch.Tensor) -> bool:
    """Whether an all-reduce of `writer`'s output rows can ride on this kernel (Exchange) with
    `writer` [N, K'] in `writer_mode` and the add + RMSNorm GEMV of `reader` [N'', N] after it,
    for one token like `sample` (shape [1, ..], dtype and device of the activations): both must
    take this kernel (`preferred`), and `reader_inputs` (residual, norm weight) be aligned."""
    if not exchange_enabled_by_env() or sample.shape[0] != 1:
        return False
    n = writer.shape[0]
    if reader.shape[1] != n or n % 8 or world > MAX_PULL_WORLD:
        return False
    return (supports(sample, writer, writer_mode) and supports(sample, reader, "add_rmsnorm")
            and preferred(writer) and preferred(reader) and aligned(writer, reader, *reader_inputs)
            and available())
