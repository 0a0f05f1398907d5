"""model/gguf_file.py against gguf-py's reader on the embedded file, and clear errors for damaged files."""
from __future__ import annotations

import numpy as np
import pytest

from model.embedded import embedded_gguf_path
from model.gguf_file import GGUFError, GGUFFile


@pytest.fixture(scope="module")
def both():
    import gguf
    path = embedded_gguf_path()
    return GGUFFile(path), gguf.GGUFReader(path)


def test_metadata_equals_gguf_py(both):
    ours, ref = both
    assert set(ours.fields) == set(ref.fields) - {k for k in ref.fields if k.startswith("GGUF.")}
    for key, f in ours.fields.items():
        assert f.contents() == ref.fields[key].contents(), key


def test_tensors_equal_gguf_py(both):
    ours, ref = both
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    by_name = {t.name: t for t in ref.tensors}
    for t in ours.tensors[:12] + ours.tensors[-3:]:
        r = by_name[t.name]
        assert t.tensor_type == r.tensor_type and list(t.shape) == list(r.shape)
        assert t.data.shape == r.data.shape and np.array_equal(t.data, np.asarray(r.data)), t.name


def test_damaged_files_raise_clear_errors(tmp_path):
    good = open(embedded_gguf_path(), "rb").read()
    cases = {"magic": b"GGUX" + good[4:], "version": good[:4] + b"\x07\x00\x00\x00" + good[8:],
             "truncated": good[:5000], "data cut": good[:len(good) // 2]}
    for name, data in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(data)
        with pytest.raises(GGUFError):
            GGUFFile(p)
