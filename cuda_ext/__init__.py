"""The engine's CUDA extension: kernels in csrc/, built lazily by build.py, wrapped by ops.py.

Importing this package does nothing: `build.is_available()` or `build.ops_module()` builds on first use.
"""
