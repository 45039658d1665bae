set -x
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false TRITON_INTERPRET=0 PYTHONPATH=src:.
nvidia-smi --query-gpu=name --format=csv,noheader
git log --oneline -1
(python3 -c "from pagedllm.layers import cuda_gemv; assert cuda_gemv._module()" & python3 -c "from pagedllm.attention import cuda_decode; cuda_decode._module()" & wait) 2>&1 | tail -3
PAGEDLLM_GEMV_RING_KB=96 timeout 100 python3 -m pytest -q -x tests/kernels/test_cuda_gemv.py 2>&1 | tail -3
timeout 110 python3 _gpu/chain.py 2>&1 | grep -v Warning | tail -12
GEMV_STAMPS=0 OUT=$OUT timeout 260 python3 benchmarks/bench_gemv_stamps_gpu.py tp2:2: tp2_r96:2:PAGEDLLM_GEMV_RING_KB=96 tp1:1: tp1_r96:1:PAGEDLLM_GEMV_RING_KB=96 2>&1 | grep -E "^---|TPOT|Error|error" | tail -12
