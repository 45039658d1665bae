export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false TRITON_INTERPRET=0 PYTHONPATH=src:.
nvidia-smi --query-gpu=name --format=csv,noheader
(python3 -c "from pagedllm.layers import cuda_gemv; assert cuda_gemv._module()" & python3 -c "from pagedllm.attention import cuda_decode; assert cuda_decode._module()" & wait) 2>&1 | tail -3
SPECS=$(timeout 150 python3 _gpu/chain2.py 2> >(grep -v Warning >&2) | tail -1)
echo "L1 specs: $SPECS"
case "$SPECS" in tp2:2:*) ;; *) SPECS="tp2:2: tp2_216_32:2:PAGEDLLM_GEMV_RING_KB=216,PAGEDLLM_GEMV_STAGE_KB=32 tp1:1: tp1_216_32:1:PAGEDLLM_GEMV_RING_KB=216,PAGEDLLM_GEMV_STAGE_KB=32";; esac
GEMV_STAMPS=0 OUT=$OUT timeout 330 python3 benchmarks/bench_gemv_stamps_gpu.py $SPECS 2>&1 | grep -E "^---|TPOT|Error|error" | tail -20
