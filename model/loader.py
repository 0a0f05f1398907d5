"""Load a model and its tokenizer from a folder, a GGUF file, or (default) the embedded model."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .config import ModelConfig, ModelError, RuntimeConfig
from .model import LlamaModel


def resolve(path: str | Path | None) -> tuple[str, Path]:
    """-> ("gguf", file) or ("hf", folder), with clear errors for what cannot be a model."""
    if path is None:
        from .embedded import embedded_gguf_path
        return "gguf", Path(embedded_gguf_path())
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return "gguf", p
    if not p.exists():
        raise ModelError(f"{p}: no such file or folder")
    if not p.is_dir():
        raise ModelError(f"{p}: expected a model folder or a .gguf file")
    if (p / "config.json").is_file():
        return "hf", p
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if not any(p.iterdir()):
        raise ModelError(f"{p}: the model folder is empty")
    raise ModelError(f"{p}: no config.json (and not exactly one .gguf file) in the model folder")


def stderr_progress(label: str):
    t0 = time.time()

    def show(done: int, total: int):
        if sys.stderr.isatty() or done == total:
            end = "\n" if done == total else ""
            print(f"\r{label}: {done}/{total} layers, {time.time() - t0:.1f} s", end=end,
                  file=sys.stderr, flush=True)
    return show


def load(path: str | Path | None = None, runtime: RuntimeConfig | None = None, progress=True,
         tokenizer: bool = True):
    """-> (LlamaModel, Tokenizer | None). progress: True (stderr), False, or a callable(done, total).

    tokenizer=False skips the tokenizer (speed runs on random-weight checkpoints have none).
    """
    from .tokenizer import Tokenizer
    runtime = runtime or RuntimeConfig()
    kind, where = resolve(path)
    if progress is True:
        progress = stderr_progress(f"Loading {where.name}")
    if kind == "gguf":
        from .gguf_loader import config_from_gguf, load_gguf_model, open_gguf
        reader = open_gguf(where)
        cfg = config_from_gguf(reader, where)
        model = load_gguf_model(LlamaModel(cfg, runtime), reader, where, progress or None)
        tok = Tokenizer.from_gguf(reader) if tokenizer else None
    else:
        from .weights import load_safetensors_model
        cfg = ModelConfig.from_file(where / "config.json")
        model = load_safetensors_model(LlamaModel(cfg, runtime), where, progress or None)
        tok = Tokenizer.from_dir(where) if tokenizer else None
    model.source = str(where)
    model.finalize()
    _return_free_memory()
    return model, tok


def _return_free_memory():
    """Hand the heap the load freed (its temporaries) back to the OS (glibc's malloc_trim; elsewhere nothing):
    otherwise the process keeps ~30 MB of it for the embedded model, ~10% of what the model itself needs."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
