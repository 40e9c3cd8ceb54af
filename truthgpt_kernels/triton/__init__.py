"""Triton kernels and their launchers, one module per op family (`<family>_fwd`, `<family>_bwd`).
They run on CUDA GPUs, and on the CPU under TRITON_INTERPRET=1 (slow; tests use small sizes)."""
