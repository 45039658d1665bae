# The next session's first call (prepared in the nineteenth, untested on a GPU):
# 1. chains of the GEMVs with the next GEMV's first chunks prefetched into L2 (one GPU);
# 2. L1 with stamps of the attention (ATTENTION_STAMPS=1) and the GEMVs: PDL mode 1 against mode 2
#    (the attention launched with PDL, waiting only for its query), the L2 prefetch of the next
#    GEMV, and TP=2 with the all-reduces in kernels of their own (is it the pushes that keep the
#    O projection 4 us past its operand?).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false TRITON_INTERPRET=0 PYTHONPATH=src:.
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
(python3 -c "from pagedllm.layers import cuda_gemv; assert cuda_gemv._module()" & python3 -c "from pagedllm.attention import cuda_decode; assert cuda_decode._module()" & wait) 2>&1 | tail -3
timeout 60 python3 -m pytest -q -x tests/kernels/test_cuda_decode.py tests/kernels/test_cuda_gemv.py 2>&1 | tail -2
timeout 120 python3 benchmarks/bench_gemv_prefetch_chain_gpu.py 2>&1 | grep -v Warning | tail -8
S=GEMV_STAMPS=1,ATTENTION_STAMPS=1
OUT=$OUT timeout 330 python3 benchmarks/bench_gemv_stamps_gpu.py tp2:2:$S tp2_pf2:2:$S,PAGEDLLM_GEMV_PREFETCH_NEXT=2 tp2_p2:2:$S,PAGEDLLM_ATTENTION_PDL=2 tp2_noex:2:$S,PAGEDLLM_GEMV_ALL_REDUCE=0 tp1:1:$S tp1_pf2:1:$S,PAGEDLLM_GEMV_PREFETCH_NEXT=2 tp1_p2:1:$S,PAGEDLLM_ATTENTION_PDL=2 2>&1 | grep -E "^---|TPOT|rank 0|Error|error|\('" | tail -40
