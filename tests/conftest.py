"""Test setup: run Triton kernels in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before anything imports triton, so this block comes first,
before gsa_compile (whose generated kernels import triton) is imported by any test module.
"""
import os

import torch

INTERPRETER = not torch.cuda.is_available()
if INTERPRETER:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("gpu", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _patch_interpreter_bf16_dot():
    """Make `tl.dot` on bf16 operands correct under TRITON_INTERPRET=1 (test-only patch).

    The interpreter (triton 3.6-3.7) stores bf16 tiles as numpy uint16 arrays holding the raw
    bits, and `InterpreterBuilder.create_dot` feeds them to np.matmul as integers: the result
    is garbage. bf16 is the top half of an fp32, so `bits << 16` viewed as float32 is the exact
    value; the product then runs in fp32, as on the GPU's tensor cores. Elementwise bf16 math
    is not patched: kernels keep it in fp32. Returns True when the patch is installed.
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - triton missing or changed
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    if original is None or getattr(original, "_gsa_bf16_patch", False):
        return original is not None

    def is_bf16(handle):
        return handle.get_element_ty() == tl.bfloat16

    def to_f32(handle):
        bits = np.ascontiguousarray(handle.data).astype(np.uint32) << np.uint32(16)
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args, **kwargs):
        # d (the accumulator) is fp32 or fp16: triton rejects out_dtype=bfloat16 for tl.dot.
        a = to_f32(a) if is_bf16(a) else a
        b = to_f32(b) if is_bf16(b) else b
        return original(self, a, b, d, *args, **kwargs)

    create_dot._gsa_bf16_patch = True
    builder.create_dot = create_dot
    return True


BF16_DOT_PATCHED = _patch_interpreter_bf16_dot() if INTERPRETER else False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def interpreter():
    """True when Triton kernels run in the CPU interpreter (slow: keep shapes small)."""
    return INTERPRETER


@pytest.fixture(autouse=INTERPRETER and os.environ.get("GSA_BOUNDS_CHECK") == "1")
def _every_access_in_bounds():
    """GSA_BOUNDS_CHECK=1: every interpreted load and store of every test inside its launch's tensors."""
    from bounds import bounds_checked
    with bounds_checked() as faults:
        yield
    assert not faults, faults[:5]
