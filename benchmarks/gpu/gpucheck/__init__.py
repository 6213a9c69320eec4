"""The GPU check's modules (benchmarks/gpu/run_gpu_check.py runs them)."""
