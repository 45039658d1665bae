export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false TRITON_INTERPRET=0 PYTHONPATH=src:.
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
(python3 -c "from pagedllm.layers import cuda_gemv; assert cuda_gemv._module()" & python3 -c "from pagedllm.attention import cuda_decode; assert cuda_decode._module()" & wait) 2>&1 | tail -3
C=PAGEDLLM_CUDA_DECODE_CARVEOUT=100
GEMV_STAMPS=1 OUT=$OUT timeout 200 python3 benchmarks/bench_gemv_stamps_gpu.py tp2:2: tp2_co:2:$C,PAGEDLLM_GEMV_TICKET_LEAD=0,PAGEDLLM_GEMV_STATIC_FIT=1 2>&1 | grep -E "^---|TPOT|rank 0|Error|error|\(0, |\(1, |\(2, " | tail -24
