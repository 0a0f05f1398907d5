"""Lazy builds of the engine's extensions with torch.utils.cpp_extension.load.

Nothing happens at import. The CUDA extension (module `exllama_ext`): the first `load()` / `is_available()` /
`ops_module()` compiles csrc/ with ninja for the visible GPUs' architectures (TORCH_CUDA_ARCH_LIST from
`torch.cuda.get_device_capability()`, unless the environment already sets it) into a cached build
folder: `$EXLLAMA_EXT_DIR`, else `~/.cache/exllama_ext/<torch version>-<cuda version>`.
The CPU kernels (module `exllama_cpu`, cpu/): `cpu.load()` / `cpu.is_available()` compile them with
-march=native for this processor (`$EXLLAMA_CPU_MARCH` another) into `$EXLLAMA_CPU_EXT_DIR`, else
`~/.cache/exllama_ext/cpu-<torch version>-<key of this CPU's model and flags>`, so a home folder shared by two
machines never hands one the other's build. Later processes reuse the objects; ninja rebuilds only what changed.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

NAME = "exllama_ext"
CSRC = Path(__file__).resolve().parent / "csrc"
CPU_NAME = "exllama_cpu"
CPU_SRC = Path(__file__).resolve().parent / "cpu"
CPU_SOURCES = ("bindings.cpp", "kernels.cpp", "pool.cpp", "sampler.cpp")

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


def ops_module():
    """The Python wrappers (cuda_ext.ops), after making sure the extension is loaded."""
    load()
    from . import ops
    return ops


class LazyExtension:
    """One extension built on first use: the lock, the cached module and the remembered failure."""

    def __init__(self, label: str, problem, build):
        self.label, self._problem, self._build = label, problem, build
        self._lock = threading.Lock()
        self._module = None
        self._failure: str | None = None
        self._warned = False

    def load(self, verbose: bool = False):
        """Build (if needed) and import; raises RuntimeError naming the reason on failure."""
        with self._lock:
            if self._module is not None:
                return self._module
            if self._failure is not None:
                raise RuntimeError(self._failure)
            try:
                problem = self._problem()
            except Exception as e:
                problem = f"{type(e).__name__}: {e}"
            if problem is not None:
                self._failure = f"{self.label} unavailable: {problem}"
                raise RuntimeError(self._failure)
            try:
                self._module = self._build(verbose)
            except Exception as e:
                msg = str(e).strip().splitlines()
                tail = " | ".join(msg[-6:]) if msg else type(e).__name__
                self._failure = f"{self.label} failed to build: {tail}"
                raise RuntimeError(self._failure) from e
            return self._module

    def is_available(self) -> bool:
        """True when built and imported; never raises. Warns once with the reason if not."""
        try:
            self.load()
            return True
        except Exception:
            if not self._warned:
                self._warned = True
                warnings.warn(self._failure or f"{self.label} unavailable", RuntimeWarning, stacklevel=3)
            return False

    def failure_reason(self) -> str | None:
        """Why it is unavailable (None if it loaded or was never tried)."""
        return self._failure


_cuda = LazyExtension("CUDA extension", _prerequisite_problem, _build)
load, is_available, failure_reason = _cuda.load, _cuda.is_available, _cuda.failure_reason


# ---- the CPU kernels ------------------------------------------------------------------------

def cpu_key() -> str:
    """A short key of this processor (model name and feature flags): -march=native builds are per CPU."""
    import hashlib
    import platform
    info = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                info += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        info += platform.processor()
    return hashlib.sha1(info.encode()).hexdigest()[:12]


def cpu_build_dir() -> Path:
    env = os.environ.get("EXLLAMA_CPU_EXT_DIR")
    if env:
        return Path(env).expanduser()
    import torch
    march = os.environ.get("EXLLAMA_CPU_MARCH", "native")
    return Path.home() / ".cache" / "exllama_ext" / f"cpu-{torch.__version__}-{cpu_key()}" \
        f"{'' if march == 'native' else '-' + march}"


def _cpu_problem() -> str | None:
    import shutil
    from torch.utils import cpp_extension
    if os.environ.get("EXLLAMA_CPU_KERNELS", "1") == "0":
        return "turned off (EXLLAMA_CPU_KERNELS=0)"
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        return "no C++ compiler found (install g++, or set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _build_cpu(verbose: bool):
    import sys
    import time
    from torch.utils import cpp_extension

    folder = cpu_build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    built = [f.stat().st_mtime for f in folder.glob(f"{CPU_NAME}*.so")]
    # (re)compiling: no module yet, or a source newer than it (ninja also rebuilds for a moved checkout: that one
    # runs without the notice)
    fresh = not built or any(f.stat().st_mtime > max(built) for f in CPU_SRC.iterdir())
    t0 = time.time()
    if fresh:
        print(f"Building the CPU kernels for this processor (first use only, about a minute) in {folder} ...",
              file=sys.stderr, flush=True)
    mod = cpp_extension.load(
        name=CPU_NAME,
        sources=[str(CPU_SRC / s) for s in CPU_SOURCES],
        # threads: the kernels' own pool (cpu/pool.h), sized by torch's intra-op thread count
        # EXLLAMA_CPU_MARCH: another -march (e.g. x86-64: the plain C++ paths) for tests and A/B builds
        extra_cflags=["-O3", f"-march={os.environ.get('EXLLAMA_CPU_MARCH', 'native')}", "-fno-math-errno"],
        build_directory=str(folder),
        with_cuda=False,
        verbose=verbose,
    )
    if fresh:
        print(f"CPU kernels built in {time.time() - t0:.0f} s ({mod.isa()})", file=sys.stderr, flush=True)
    return mod


cpu = LazyExtension("CPU kernels", _cpu_problem, _build_cpu)
