import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

BOTCHAN = ROOT / "data" / "botchan.txt"


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors on a busy 2-core box: a parallel op can wait a whole scheduler quantum (~10 ms),
    so modules of many small ops run on one thread (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def botchan_text() -> str:
    if not BOTCHAN.is_file():
        from tools.fetch_botchan import fetch
        fetch(BOTCHAN)
    return BOTCHAN.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def embedded_fp32():
    """The embedded SmolLM2-135M on the CPU in fp32 (exact reference settings), loaded once."""
    from model.config import RuntimeConfig
    from model.loader import load
    return load(None, RuntimeConfig(device="cpu", dtype="float32", weight_dtype="float32", cpu_weights="dense",
                                    max_seq_len=1024), progress=False)


@pytest.fixture(scope="session")
def hf_embedded():
    """transformers' own load of the same GGUF (fp32, CPU): the accuracy reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from model.embedded import embedded_gguf_path
    p = Path(embedded_gguf_path())
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    m = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    return m, tok
