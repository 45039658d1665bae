"""Specification of the CUDA bulk-copy GEMV (layers/cuda_gemv.py): GPU only (sm_90+ and nvcc).

Skipped on CPU (CI). On a Hopper GPU each form is checked against an fp32 reference of the same
roundings (within the bf16 output's rounding), repeat launches must be bitwise equal (the
ticketed tail must not change which rows a launch computes, only who computes them), and the
skinny-GEMM hooks must route to it when the tuner picks it. The plan and the switch are checked
everywhere. On a GPU run it with TRITON_INTERPRET=0 (tests/kernels/conftest.py defaults to the
interpreter, for the CPU; the hooks test's Triton fallback would then run interpreted on CUDA
tensors and fail).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.layers import cuda_gemv

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
gpu_only = pytest.mark.skipif(not HOPPER, reason="the CUDA GEMV needs an sm_90+ GPU")


def test_plan_fits_shared_memory_and_splits_the_rows() -> None:
    for n, k in [(3072, 4096), (4096, 2048), (28672, 4096), (4096, 14336), (7, 8), (1, 16384)]:
        p = cuda_gemv.plan(n, k)
        assert p is not None
        stage = p.rows_per_stage * 2 * k
        ring_offset = (1024 + 2 * k + 127) // 128 * 128
        assert ring_offset + p.num_slots * stage <= 227 * 1024 and p.num_slots >= 2
        chunks = -(-n // p.rows_per_stage)
        assert 0 <= p.static_chunks * 132 <= chunks  # the static slabs never pass the last chunk
    assert cuda_gemv.plan(4096, 120000) is None  # a row larger than the ring


def test_pulled_operand_waits_for_the_writer_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cuda_gemv.PULL_WAIT_ENV_VAR, raising=False)
    assert not cuda_gemv.pull_waits_for_writer()
    for value, expected in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv(cuda_gemv.PULL_WAIT_ENV_VAR, value)
        assert cuda_gemv.pull_waits_for_writer() is expected


def test_pull_polls_unless_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cuda_gemv.PULL_POLL_ENV_VAR, raising=False)
    assert cuda_gemv.pull_polls()
    for value, expected in (("0", False), ("false", False), ("1", True)):
        monkeypatch.setenv(cuda_gemv.PULL_POLL_ENV_VAR, value)
        assert cuda_gemv.pull_polls() is expected


def test_local_handoff_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cuda_gemv.LOCAL_HANDOFF_ENV_VAR, raising=False)
    assert not cuda_gemv.local_handoff_enabled()
    for value, expected in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv(cuda_gemv.LOCAL_HANDOFF_ENV_VAR, value)
        assert cuda_gemv.local_handoff_enabled() is expected


def test_switch_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cuda_gemv.DISABLE_ENV_VAR, "1")
    assert not cuda_gemv.enabled_by_env() and not cuda_gemv.available()
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    assert not cuda_gemv.supports(x, torch.zeros(32, 64, dtype=torch.bfloat16), "plain")


def _assert_site_calls(epoch: torch.Tensor, calls: int) -> None:
    """A site's epoch after `calls` calls: every reader CTA (one per SM) counted once a call."""
    sms = torch.cuda.get_device_properties(epoch.device).multi_processor_count
    assert epoch.tolist() == [calls * sms]


def _case(mode: str, n: int, k: int, seed: int, bias: bool):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.05).bfloat16()
    b = (torch.randn(n, device="cuda", generator=g) * 0.1).bfloat16() if bias else None
    out = torch.full((1, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    kwargs = {}
    if mode == "add_rmsnorm":
        x = torch.randn(1, k, device="cuda", generator=g).bfloat16()
        r = torch.randn(1, k, device="cuda", generator=g).bfloat16()
        nw = (1 + 0.1 * torch.randn(k, device="cuda", generator=g)).bfloat16()
        s = (x.float() + r.float()).bfloat16()
        operand = (s.float() * nw.float()).bfloat16().float()
        ref = operand @ w.float().t() * torch.rsqrt(s.float().pow(2).mean() + 1e-6)
        kwargs = dict(residual=r, norm_weight=nw, eps=1e-6,
                      residual_out=torch.empty(1, k, device="cuda", dtype=torch.bfloat16))
        expected_residual = s
    elif mode == "silu":
        x = torch.randn(1, 2 * k, device="cuda", generator=g).bfloat16()
        operand = (F.silu(x[:, :k].float()).bfloat16().float() * x[:, k:].float()).bfloat16().float()
        ref = operand @ w.float().t()
        expected_residual = None
    else:
        x = torch.randn(1, k, device="cuda", generator=g).bfloat16()
        ref = x.float() @ w.float().t()
        expected_residual = None
    if b is not None:
        ref = ref + b.float()
    return x, w, b, out, kwargs, ref, expected_residual


@gpu_only
@pytest.mark.parametrize("mode", ["plain", "silu", "add_rmsnorm"])
@pytest.mark.parametrize("n,k", [(3072, 4096), (4096, 7168), (2560, 8192), (4096, 2048), (1000, 1048), (5, 8)])
def test_matches_fp32_reference_and_repeats_bitwise(mode: str, n: int, k: int) -> None:
    if not cuda_gemv.available():
        pytest.skip("the extension did not build here (no nvcc?)")
    x, w, b, out, kwargs, ref, expected_residual = _case(mode, n, k, seed=n + k, bias=mode != "silu")
    first = cuda_gemv.gemv(mode, x, w, out, b, **kwargs).clone()
    for _ in range(3):  # back to back (PDL): the ticket counter must stay in step
        again = cuda_gemv.gemv(mode, x, w, torch.empty_like(out), b, **kwargs)
        assert torch.equal(again, first)
    torch.cuda.synchronize()
    assert not first.isnan().any()
    # bf16 output: within two roundings of the largest value
    assert (first.float() - ref).abs().max().item() <= 2 * 2**-8 * ref.abs().max().item()
    if expected_residual is not None:
        assert torch.equal(kwargs["residual_out"], expected_residual)


@gpu_only
def test_skinny_gemm_hooks_route_to_the_cuda_kernel() -> None:
    if not cuda_gemv.available():
        pytest.skip("the extension did not build here (no nvcc?)")
    from pagedllm.layers import triton_gemv as tg
    from pagedllm.layers import triton_gemv_norm as tn

    x, w, _, _, _, ref, _ = _case("plain", 512, 1024, seed=1, bias=False)
    out = tg.skinny_linear(x, w, config=tg.CUDA_GEMV)
    assert (out.float() - ref).abs().max().item() <= 2 * 2**-8 * ref.abs().max().item()
    h, w, b, _, kwargs, ref, res = _case("add_rmsnorm", 512, 1024, seed=2, bias=True)
    out, residual_out = tn.skinny_add_rmsnorm_linear(h, kwargs["residual"], kwargs["norm_weight"], 1e-6, w, b,
                                                     config=tg.CUDA_GEMV)
    assert (out.float() - ref).abs().max().item() <= 2 * 2**-8 * ref.abs().max().item()
    assert torch.equal(residual_out, res)
    # a view off the 16-byte boundary falls back to a Triton config (same product within rounding)
    x, w, _, _, _, ref, _ = _case("plain", 512, 1024, seed=3, bias=False)
    shifted = torch.zeros(1, 1025, device="cuda", dtype=torch.bfloat16)
    shifted[:, 1:] = x
    view = shifted[:, 1:]
    assert not cuda_gemv.aligned(view)
    out = tg.skinny_linear(view, w, config=tg.CUDA_GEMV)
    assert (out.float() - ref).abs().max().item() <= 2 * 2**-8 * ref.abs().max().item()


def test_preferred_untimed_for_large_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    small = torch.empty(1024, 1024, dtype=torch.bfloat16)  # 2 MiB
    large = torch.empty(4096, 2048, dtype=torch.bfloat16)  # 16 MiB: the smallest 8B GEMV at TP=2
    monkeypatch.delenv(cuda_gemv.PREFER_ENV_VAR, raising=False)
    assert not cuda_gemv.preferred(small) and cuda_gemv.preferred(large)
    monkeypatch.setenv(cuda_gemv.PREFER_ENV_VAR, "1")
    assert cuda_gemv.preferred(small) and cuda_gemv.preferred(large)
    monkeypatch.setenv(cuda_gemv.PREFER_ENV_VAR, "0")
    assert not cuda_gemv.preferred(small) and not cuda_gemv.preferred(large)


_SITE_SHAPE = (4096, 2048, 3072)  # a site's tests: hidden size, the writer's K, the reader's N


def _site_weights(seed: int,
                  writers: int = 1) -> tuple[torch.Generator, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A site's test weights from `seed`: the generator (for the inputs that follow), each
    writer's [hidden, K] weight, the reader's [N, hidden] weight and its norm weight (bf16)."""
    hidden, k_o, n_reader = _SITE_SHAPE
    g = torch.Generator(device="cuda").manual_seed(seed)
    w_o = [(torch.randn(hidden, k_o, device="cuda", generator=g) * 0.05).bfloat16() for _ in range(writers)]
    w_r = (torch.randn(n_reader, hidden, device="cuda", generator=g) * 0.05).bfloat16()
    nw = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).bfloat16()
    return g, w_o, w_r, nw


@gpu_only
@pytest.mark.parametrize("writer_mode", ["plain", "silu"])
@pytest.mark.parametrize("pull_wait,pull_poll", [("0", "1"), ("1", "0"), ("0", "0")])
def test_all_reduce_carried_by_push_and_pull_equals_the_one_shot_sum(writer_mode: str, pull_wait: str, pull_poll: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks simulated on one GPU: each pushes its O- (or gated down-) projection rows into the one site buffer
    (with PAGEDLLM_GEMV_PULL_POLL=0 also its count), the add + RMSNorm GEMV takes both ranks'
    rows by their tags and sums them; bitwise equal to summing the ranks' bf16 partials in rank
    order (the one-shot all-reduce) and running the GEMV on that, call after call (the site's
    calls advance). The reader trusts the tags alone (the default) or also waits for the writer
    grid (PAGEDLLM_GEMV_PULL_WAIT=1)."""
    monkeypatch.setenv(cuda_gemv.PULL_WAIT_ENV_VAR, pull_wait)
    monkeypatch.setenv(cuda_gemv.PULL_POLL_ENV_VAR, pull_poll)  # stale words polled alone, no counts
    if not cuda_gemv.available():
        pytest.skip("the extension did not build here (no nvcc?)")
    hidden, k_o, n_reader = _SITE_SHAPE
    g, w_o, w_r, nw = _site_weights(11, writers=2)
    buffer = torch.zeros(cuda_gemv.exchange_buffer_bytes(2, hidden) // 8, dtype=torch.int64, device="cuda")
    epoch = torch.zeros(1, dtype=torch.int64, device="cuda")
    for call in range(3):
        width = k_o * (2 if writer_mode == "silu" else 1)
        x = [torch.randn(1, width, device="cuda", generator=g).bfloat16() for _ in range(2)]
        residual = torch.randn(1, hidden, device="cuda", generator=g).bfloat16()
        for rank in (0, 1):
            cuda_gemv.gemv(writer_mode, x[rank], w_o[rank], None,
                           push=cuda_gemv.Exchange(buffer, (buffer.data_ptr(),), epoch, rank, 2))
        out = torch.empty(1, n_reader, device="cuda", dtype=torch.bfloat16)
        res_out = torch.empty_like(residual)
        cuda_gemv.gemv("add_rmsnorm", residual, w_r, out, None, residual, nw, 1e-6, res_out,
                       pull=cuda_gemv.Exchange(buffer, (buffer.data_ptr(),), epoch, 0, 2))
        partials = [cuda_gemv.gemv(writer_mode, x[r], w_o[r], torch.empty(1, hidden, device="cuda",
                                                                      dtype=torch.bfloat16)).float() for r in (0, 1)]
        summed = (partials[0] + partials[1]).bfloat16()
        ref = torch.empty_like(out)
        ref_res = torch.empty_like(residual)
        cuda_gemv.gemv("add_rmsnorm", summed, w_r, ref, None, residual, nw, 1e-6, ref_res)
        torch.cuda.synchronize()
        assert torch.equal(res_out, ref_res) and torch.equal(out, ref), f"call {call}"
        _assert_site_calls(epoch, call + 1)
        counts = buffer[-2:].tolist()  # every rank's rows counted, once per call (none when polled)
        assert counts == [0 if pull_poll == "1" else hidden * (call + 1)] * 2


@gpu_only
@pytest.mark.parametrize("writer_mode", ["plain", "silu"])
@pytest.mark.parametrize("pull_poll", ["1", "0"])
def test_local_hand_off_by_tags_is_the_plain_hand_off(writer_mode: str, pull_poll: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """One GPU (local_exchanges, world 1): the row-parallel GEMV pushes its tagged rows into the
    site, the add + RMSNorm GEMV takes them by their tags without waiting for the writer grid;
    bitwise the output of the plain hand-off (the writer's bf16 rows as the reader's input), call
    after call, with CUDA-graph replays of the pair as the engine runs them."""
    monkeypatch.setenv(cuda_gemv.PULL_POLL_ENV_VAR, pull_poll)
    if not cuda_gemv.available():
        pytest.skip("the extension did not build here (no nvcc?)")
    hidden, k_o, n_reader = _SITE_SHAPE
    g, (w_o,), w_r, nw = _site_weights(23)
    (site,) = cuda_gemv.local_exchanges([hidden], torch.device("cuda"))
    width = k_o * (2 if writer_mode == "silu" else 1)
    x = torch.empty(1, width, device="cuda", dtype=torch.bfloat16)
    residual = torch.empty(1, hidden, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, n_reader, device="cuda", dtype=torch.bfloat16)
    res_out = torch.empty_like(residual)

    def pair() -> None:
        cuda_gemv.gemv(writer_mode, x, w_o, None, push=site)
        cuda_gemv.gemv("add_rmsnorm", residual, w_r, out, None, residual, nw, 1e-6, res_out, pull=site)

    pair()  # the extension's first launches outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pair()
    for call in range(4):
        x.copy_(torch.randn(1, width, device="cuda", generator=g).bfloat16())
        residual.copy_(torch.randn(1, hidden, device="cuda", generator=g).bfloat16())
        graph.replay() if call % 2 else pair()
        rows = cuda_gemv.gemv(writer_mode, x, w_o, torch.empty(1, hidden, device="cuda", dtype=torch.bfloat16))
        ref, ref_res = torch.empty_like(out), torch.empty_like(residual)
        cuda_gemv.gemv("add_rmsnorm", rows, w_r, ref, None, residual, nw, 1e-6, ref_res)
        torch.cuda.synchronize()
        assert torch.equal(out, ref) and torch.equal(res_out, ref_res), f"call {call}"
    _assert_site_calls(site.epoch, 5)  # the warm-up and 4 calls (the capture launches nothing)


@gpu_only
@pytest.mark.parametrize("pull_poll", ["1", "0"])
def test_pull_waits_for_a_peer_whose_rows_come_late(pull_poll: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader's fallback: when the peer's rows are not in at its first load (stale tags), it
    polls the stale words (or, PAGEDLLM_GEMV_PULL_POLL=0, waits for the counts and reloads). The
    peer is a side stream that writes rank 1's tagged words and count ~1 ms after the reader has
    started (small kernels that fit beside the reader's CTAs); the result must still be bitwise
    the one-shot sum's (both passed on an H200 in the twenty-third session)."""
    monkeypatch.setenv(cuda_gemv.PULL_POLL_ENV_VAR, pull_poll)
    if not cuda_gemv.available():
        pytest.skip("the extension did not build here (no nvcc?)")
    hidden, k_o, n_reader = _SITE_SHAPE
    g, (w_o,), w_r, nw = _site_weights(5)
    buffer = torch.zeros(cuda_gemv.exchange_buffer_bytes(2, hidden) // 8, dtype=torch.int64, device="cuda")
    words = buffer.view(torch.int32)
    epoch = torch.zeros(1, dtype=torch.int64, device="cuda")
    site = cuda_gemv.Exchange(buffer, (buffer.data_ptr(),), epoch, 0, 2)
    peer_stream = torch.cuda.Stream()
    for call in range(2):
        x = torch.randn(1, k_o, device="cuda", generator=g).bfloat16()
        peer_rows = torch.randn(1, hidden, device="cuda", generator=g).bfloat16()
        residual = torch.randn(1, hidden, device="cuda", generator=g).bfloat16()
        tag = (call + 1) << 16  # the site's calls + 1
        peer_words = ((peer_rows.view(torch.int16).to(torch.int64) & 0xFFFF) | tag).to(torch.int32).view(-1)
        out = torch.empty(1, n_reader, device="cuda", dtype=torch.bfloat16)
        res_out = torch.empty_like(residual)
        torch.cuda.synchronize()
        cuda_gemv.gemv("plain", x, w_o, None, push=site)  # rank 0's rows, on time
        with torch.cuda.stream(peer_stream):
            torch.cuda._sleep(2_000_000)  # ~1 ms: the reader is polling by then
            words[hidden : 2 * hidden].copy_(peer_words)
            buffer[-1:].add_(hidden)  # rank 1's count
        cuda_gemv.gemv("add_rmsnorm", residual, w_r, out, None, residual, nw, 1e-6, res_out, pull=site)
        torch.cuda.synchronize()
        own = cuda_gemv.gemv("plain", x, w_o, torch.empty(1, hidden, device="cuda", dtype=torch.bfloat16))
        summed = (own.float() + peer_rows.float()).bfloat16()
        ref, ref_res = torch.empty_like(out), torch.empty_like(residual)
        cuda_gemv.gemv("add_rmsnorm", summed, w_r, ref, None, residual, nw, 1e-6, ref_res)
        torch.cuda.synchronize()
        assert torch.equal(res_out, ref_res) and torch.equal(out, ref), f"call {call}"
        _assert_site_calls(epoch, call + 1)
