import cProfile, logging, os, pstats, sys, time
logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7d %(name)s: %(message)s")
sys.path.insert(0, "benchmarks")
from bench_tp_gpu import _engine  # noqa: E402
prof = cProfile.Profile()
t0 = time.perf_counter()
prof.enable()
engine, startup = _engine("llama-3.1-8b", 1, 1, max_model_len=4096, max_num_seqs=8)
prof.disable()
print(f"STARTUP {os.environ.get('PAGEDLLM_DISABLE_CUDA_GEMV', 'default')}: {startup:.1f} s (wall {time.perf_counter() - t0:.1f})")
st = pstats.Stats(prof)
st.sort_stats("cumulative").print_stats(r"pagedllm|cpp_extension|triton/runtime", 28)
engine.shutdown()
