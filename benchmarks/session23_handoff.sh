#!/usr/bin/env bash
# One device call (2 GPUs; docs/parallelism.md, "Twenty-second session"): what the tagged
# hand-off of the all-reduce sites costs over the plain one. On one GPU the sites can carry the
# hand-off alone (PAGEDLLM_GEMV_LOCAL_HANDOFF=1), which measured 116 us a step slower: the
# mechanism's own cost, which TP=2 pays at its 64 sites. Variants that isolate its parts (stale
# words polled alone instead of after every writer CTA's count; the site's calls counted by the
# reader CTAs as their operand is in, not advanced behind a fence and a returning atomic on
# every reader CTA's way out; the pulled reader's stages ahead; the wait for the writer grid),
# TPOT first, then the per-CTA stamps of the plain and the tagged hand-off at TP=1.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
    TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false TRITON_INTERPRET=0 PYTHONPATH=src:.
OUT=${OUT:-.}
(python3 -c "from pagedllm.layers import cuda_gemv; assert cuda_gemv._module()" &
 python3 -c "from pagedllm.attention import cuda_decode; assert cuda_decode._module()" & wait) 2>&1 | tail -3
python3 -m pytest -q -x tests/kernels/test_cuda_gemv.py 2>&1 | tail -2
GEMV_STAMPS=0 python3 benchmarks/bench_gemv_stamps_gpu.py tp2:2: tp2_poll:2:PAGEDLLM_GEMV_PULL_POLL=1 \
    tp2_count:2:PAGEDLLM_GEMV_EPOCH_BY_COUNT=1 tp2_poll_count:2:PAGEDLLM_GEMV_PULL_POLL=1,PAGEDLLM_GEMV_EPOCH_BY_COUNT=1 \
    tp2_ahead2:2:BENCH_GEMV_AHEAD_PULL=2 tp1:1: tp1_tags:1:PAGEDLLM_GEMV_LOCAL_HANDOFF=1 \
    tp1_tags_poll:1:PAGEDLLM_GEMV_LOCAL_HANDOFF=1,PAGEDLLM_GEMV_PULL_POLL=1 \
    tp1_tags_count:1:PAGEDLLM_GEMV_LOCAL_HANDOFF=1,PAGEDLLM_GEMV_EPOCH_BY_COUNT=1 \
    tp1_tags_ahead2:1:PAGEDLLM_GEMV_LOCAL_HANDOFF=1,BENCH_GEMV_AHEAD_PULL=2 \
    tp1_tags_wait:1:PAGEDLLM_GEMV_LOCAL_HANDOFF=1,PAGEDLLM_GEMV_PULL_WAIT=1 2>&1 \
    | tee "$OUT/l1.log" | grep -E "^tp|Error"
mkdir -p "$OUT/stamps"
OUT="$OUT/stamps" python3 benchmarks/bench_gemv_stamps_gpu.py tp1:1: tp1_tags:1:PAGEDLLM_GEMV_LOCAL_HANDOFF=1 2>&1 \
    | tee "$OUT/stamps.log" | tail -40
