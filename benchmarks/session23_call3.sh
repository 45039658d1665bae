#!/usr/bin/env bash
# One device call (2 GPUs; docs/parallelism.md, "Twenty-third session"): the late-peer test with
# the tickets drawn by the operand (failed in call 2: its traceback), then L1 repeated: the default
# (counted calls), the readers polling stale words with no writer counts (PAGEDLLM_GEMV_PULL_POLL=1),
# and that with the tickets drawn once the operand is in (PAGEDLLM_GEMV_TICKETS_BY_OPERAND=1).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
    TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false TRITON_INTERPRET=0 PYTHONPATH=src:.
OUT=${OUT:-.}
(python3 -c "from pagedllm.layers import cuda_gemv; assert cuda_gemv._module()" &
 python3 -c "from pagedllm.attention import cuda_decode; assert cuda_decode._module()" & wait) 2>&1 | tail -3
timeout 60 python3 -m pytest -q --tb=short "tests/kernels/test_cuda_gemv.py::test_pull_waits_for_a_peer_whose_rows_come_late" 2>&1 | tail -30 | tee "$OUT/late.log"
timeout 90 python3 -m pytest -q --tb=line tests/kernels/test_cuda_gemv.py 2>&1 | tail -6 | tee "$OUT/tests.log"
T=PAGEDLLM_GEMV_TICKETS_BY_OPERAND=1
P=PAGEDLLM_GEMV_PULL_POLL=1
GEMV_STAMPS=0 python3 benchmarks/bench_gemv_stamps_gpu.py tp2:2: tp2_pt:2:$P,$T tp2_p:2:$P \
    tp2_b:2: tp2_pt_b:2:$P,$T tp2_p_b:2:$P tp2_pt_c:2:$P,$T tp1:1: tp1_b:1: 2>&1 \
    | tee "$OUT/l1.log" | grep -E "^tp|Error"
