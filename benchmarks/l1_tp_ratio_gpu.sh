#!/usr/bin/env bash
# Issue 6's L1 target in one device call (2 GPUs): TP=2 time per output token against TP=1's
# from the same run, each measured three times (benchmarks/bench_gemv_stamps_gpu.py: L1 =
# Llama-3.1-8B dimensions, bf16, batch 1, prompt 128, 256 tokens; greedy tokens compared within
# each TP), with the GEMV kernels' GPU tests first and one TP=2 run of the counted hand-off
# (PAGEDLLM_GEMV_PULL_POLL=0) as the reference the default replaced. Prints the ratio of the
# means last; raw lines in $OUT/l1.log.
#   OUT=$OUT bash benchmarks/l1_tp_ratio_gpu.sh      (about 7 minutes on 2 x H200)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
    TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false TRITON_INTERPRET=0 PYTHONPATH=src:.
OUT=${OUT:-.}
(python3 -c "from pagedllm.layers import cuda_gemv; assert cuda_gemv._module()" &
 python3 -c "from pagedllm.attention import cuda_decode; assert cuda_decode._module()" & wait) 2>&1 | tail -3
timeout 120 python3 -m pytest -q --tb=short tests/kernels/test_cuda_gemv.py 2>&1 | tail -15 | tee "$OUT/tests.log"
GEMV_STAMPS=0 python3 benchmarks/bench_gemv_stamps_gpu.py tp2:2: tp2_counted:2:PAGEDLLM_GEMV_PULL_POLL=0 \
    tp2_b:2: tp2_c:2: tp1:1: tp1_b:1: tp1_c:1: 2>&1 | tee "$OUT/l1.log" | grep -E "^tp|Error"
python3 - "$OUT/l1.log" <<'PY'
import re, statistics, sys
tpot = {}
for line in open(sys.argv[1]):
    m = re.match(r"^(tp\d)(_\w+)?\s+TPOT ([\d.]+) ms", line)
    if m and (m.group(2) or "") in ("", "_b", "_c"):
        tpot.setdefault(m.group(1), []).append(float(m.group(3)))
if "tp1" in tpot and "tp2" in tpot:
    tp1, tp2 = statistics.mean(tpot["tp1"]), statistics.mean(tpot["tp2"])
    print(f"TP=2 {tpot['tp2']} mean {tp2:.3f} ms, TP=1 {tpot['tp1']} mean {tp1:.3f} ms: ratio {tp2 / tp1:.4f}")
PY
