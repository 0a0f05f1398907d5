"""The engine's native extensions, built lazily by build.py: the CUDA kernels (csrc/, wrapped by ops.py) and the
CPU kernels (cpu/: the 4-bit GEMV, attention, sampling and the one-call decode step; model/ops.py calls them).

Importing this package does nothing: `build.is_available()` / `build.ops_module()` (CUDA) and
`build.cpu.is_available()` / `build.cpu.load()` (CPU) build on first use.
"""
