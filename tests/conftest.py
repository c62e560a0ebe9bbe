import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PARITY_DIR = pathlib.Path(os.environ.get("PIXAL3D_PARITY_DIR", REPO.parent / "shared" / "parity"))


@pytest.fixture(scope="session")
def parity_dir() -> pathlib.Path:
    if not PARITY_DIR.is_dir():
        pytest.fail(f"parity fixtures not found at {PARITY_DIR}; set PIXAL3D_PARITY_DIR")
    return PARITY_DIR

# Triton kernels (kernels/) run through Triton's interpreter where there is no GPU; the flag is read when a kernel
# is defined, so it must be set before any test imports them.
try:
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


# Triton 3.6's interpreter turns a scalar into an index with `int(array_of_shape_1)`, which NumPy >= 2.4 rejects, so
# every kernel loop with a run-time trip count fails there (triton-lang/triton#9171, fixed upstream by #9172 after
# 3.6). Until the venv has a Triton with that fix, the interpreter's `__index__` gets the fix's one-line change here.
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
