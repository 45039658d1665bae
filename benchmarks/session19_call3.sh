export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false TRITON_INTERPRET=0 PYTHONPATH=src:.
nvidia-smi --query-gpu=name --format=csv,noheader
(python3 -c "from pagedllm.layers import cuda_gemv; assert cuda_gemv._module()" & python3 -c "from pagedllm.attention import cuda_decode; assert cuda_decode._module()" & wait) 2>&1 | tail -3
timeout 60 python3 -m pytest -q -x tests/kernels/test_cuda_gemv.py tests/kernels/test_cuda_decode.py 2>&1 | tail -2
C=PAGEDLLM_CUDA_DECODE_CARVEOUT=100
GEMV_STAMPS=0 OUT=$OUT timeout 400 python3 benchmarks/bench_gemv_stamps_gpu.py tp2:2: tp2_p2:2:PAGEDLLM_ATTENTION_PDL=2 tp2_p2co:2:PAGEDLLM_ATTENTION_PDL=2,$C tp2_b:2: tp1:1: tp1_p2:1:PAGEDLLM_ATTENTION_PDL=2 tp1_p2co:1:PAGEDLLM_ATTENTION_PDL=2,$C 2>&1 | grep -E "^---|TPOT|Error|error" | tail -20
