"""Kernel tests run through Triton's interpreter where there is no GPU (tests/conftest.py sets TRITON_INTERPRET).

Triton 3.6's interpreter turns a scalar into an index with `int(array_of_shape_1)`, which NumPy >= 2.4 rejects, so
every loop with a run-time trip count fails there (triton-lang/triton#9171, fixed upstream by #9172 after 3.6).
Until the venv has a Triton with that fix, the interpreter's `__index__` gets the fix's one-line change here.
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        from triton.runtime import interpreter as _interpreter
    except ImportError:
        _interpreter = None

    if _interpreter is not None:
        _patch_lang_tensor = _interpreter._patch_lang_tensor

        def _patch_lang_tensor_with_scalar_index(tensor, scope):
            _patch_lang_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

        _interpreter._patch_lang_tensor = _patch_lang_tensor_with_scalar_index


@pytest.fixture
def triton_kernels(monkeypatch):
    """Forces the Triton kernels (compiled on a GPU, interpreted on CPU) in place of the references."""
    pytest.importorskip("triton")
    monkeypatch.setenv("PIXAL3D_KERNELS", "triton")
