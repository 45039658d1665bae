#!/usr/bin/env bash
# One device call (2 GPUs; docs/parallelism.md, "Twenty-third session"). The site's calls are now
# counted by the reader CTAs as their operand is in (call 1: L1 TP=2 30 us faster than counting
# them on the reader CTAs' way out). Two more suspects, at TP=2 and in the one-GPU tagged
# hand-off that isolates the mechanism's cost: the pulled reader's producer drawing its first
# ticket once the operand is in instead of after the writer grid completes
# (PAGEDLLM_GEMV_TICKETS_BY_OPERAND=1), and the writers counting no rows while the readers poll
# their stale words (PAGEDLLM_GEMV_PULL_POLL=1). Each baseline twice, in the same call.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
    TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false TRITON_INTERPRET=0 PYTHONPATH=src:.
OUT=${OUT:-.}
(python3 -c "from pagedllm.layers import cuda_gemv; assert cuda_gemv._module()" &
 python3 -c "from pagedllm.attention import cuda_decode; assert cuda_decode._module()" & wait) 2>&1 | tail -3
python3 -m pytest -q -x tests/kernels/test_cuda_gemv.py 2>&1 | tail -2
T=PAGEDLLM_GEMV_TICKETS_BY_OPERAND=1
P=PAGEDLLM_GEMV_PULL_POLL=1
L=PAGEDLLM_GEMV_LOCAL_HANDOFF=1
GEMV_STAMPS=0 python3 benchmarks/bench_gemv_stamps_gpu.py tp2:2: tp2_tickets:2:$T tp2_poll:2:$P \
    tp2_poll_tickets:2:$P,$T tp2_again:2: tp2_tickets_again:2:$T \
    tp1:1: tp1_tags:1:$L tp1_tags_tickets:1:$L,$T tp1_tags_poll_tickets:1:$L,$P,$T tp1_again:1: 2>&1 \
    | tee "$OUT/l1.log" | grep -E "^tp|Error"
