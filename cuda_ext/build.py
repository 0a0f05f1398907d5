"""Lazy build of the CUDA extension (module `exllama_ext`) with torch.utils.cpp_extension.load.

Nothing happens at import: the first `load()` / `is_available()` / `ops_module()` compiles the
sources below with ninja for the visible GPUs' architectures (TORCH_CUDA_ARCH_LIST from
`torch.cuda.get_device_capability()`, unless the environment already sets it) into a cached build
folder: `$EXLLAMA_EXT_DIR`, else `~/.cache/exllama_ext/<torch version>-<cuda version>`. Later
processes reuse the objects there; ninja rebuilds only what changed.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

NAME = "exllama_ext"
CSRC = Path(__file__).resolve().parent / "csrc"

# The one list of sources (headers are tracked by ninja through the compiler's depfiles).
SOURCES = (
    "bindings.cpp",
    "ops_q4.cpp",
    "ops_norm.cpp",
    "ops_rotary.cpp",
    "ops_act.cpp",
    "ops_decode.cpp",
    "ops_embed.cpp",
    "ops_argmax.cpp",
    "q4_gemm.cu",
    "q4_gemm_m1.cu",
    "q4_gemm_m2_3.cu",
    "q4_gemm_m4_5.cu",
    "q4_gemm_m6_7_8.cu",
    "q4_dequant.cu",
    "q4_mma.cu",
    "q4_wgmma.cu",
    "dense_gemv.cu",
    "norm.cu",
    "rotary.cu",
    "act.cu",
    "decode.cu",
    "embed.cu",
    "argmax.cu",
)

CFLAGS = ["-O3"]
CUDA_CFLAGS = ["-O3", "-lineinfo"]

_lock = threading.Lock()
_module = None
_failure: str | None = None
_warned = False


def build_dir() -> Path:
    """Where the objects and the built module live (created on first build)."""
    env = os.environ.get("EXLLAMA_EXT_DIR")
    if env:
        return Path(env).expanduser()
    import torch
    return Path.home() / ".cache" / "exllama_ext" / f"{torch.__version__}-{torch.version.cuda}"


def arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST for the visible GPUs, e.g. '9.0a' on an H100 (the 'a' target has wgmma, which
    the fused prompt GEMM needs; such a build runs on sm_90 devices only, the ones it is built for)."""
    import torch
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "") for major, minor in caps)


def _prerequisite_problem() -> str | None:
    """Why a build cannot even start, or None."""
    try:
        import torch
    except Exception as e:  # pragma: no cover - torch is a hard dependency of the project
        return f"torch does not import ({e})"
    if torch.version.cuda is None:
        return f"PyTorch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"
    nvcc = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
    if not nvcc.exists():
        return f"nvcc not found at {nvcc}"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def load(verbose: bool = False):
    """Build (if needed) and import the extension; raises RuntimeError naming the reason on failure."""
    global _module, _failure
    with _lock:
        if _module is not None:
            return _module
        if _failure is not None:
            raise RuntimeError(_failure)
        try:
            problem = _prerequisite_problem()
        except Exception as e:
            problem = f"{type(e).__name__}: {e}"
        if problem is not None:
            _failure = f"CUDA extension unavailable: {problem}"
            raise RuntimeError(_failure)
        try:
            _module = _build(verbose)
        except Exception as e:
            msg = str(e).strip().splitlines()
            tail = " | ".join(msg[-6:]) if msg else type(e).__name__
            _failure = f"CUDA extension failed to build in {build_dir()}: {tail}"
            raise RuntimeError(_failure) from e
        return _module


def _build(verbose: bool):
    from torch.utils import cpp_extension

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not old_arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list()
    # EXLLAMA_NVCC_FLAGS: extra nvcc flags for A/B builds (with their own EXLLAMA_EXT_DIR); its -D macros reach
    # the C++ wrappers too
    extra = os.environ.get("EXLLAMA_NVCC_FLAGS", "").split()
    try:
        return cpp_extension.load(
            name=NAME,
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=CFLAGS + [f for f in extra if f.startswith("-D")],
            extra_cuda_cflags=CUDA_CFLAGS + extra,
            extra_include_paths=[str(CSRC)],
            build_directory=str(folder),
            with_cuda=True,
            verbose=verbose,
        )
    finally:
        if not old_arch:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)


def is_available() -> bool:
    """True when the extension is built and imported; never raises. Warns once with the reason if not."""
    global _warned
    try:
        load()
        return True
    except Exception:
        if not _warned:
            _warned = True
            warnings.warn(failure_reason() or "CUDA extension unavailable", RuntimeWarning, stacklevel=2)
        return False


def failure_reason() -> str | None:
    """Why the extension is unavailable (None if it loaded or was never tried)."""
    return _failure


def ops_module():
    """The Python wrappers (cuda_ext.ops), after making sure the extension is loaded."""
    load()
    from . import ops
    return ops
