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

from slow import RUN_SLOW  # noqa: E402

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


def _patch_interpreter_device_calls():
    """Patch triton.language for a jit function called from a kernel once per launch, not once per call
    (test-only; CI time: 5-10 % of an interpreted forward+backward).

    The interpreter (triton 3.7) re-runs `_patch_lang` (inspect.getmembers over triton.language) on every
    call of a device function, and tl.sum, tl.cumsum, tl.max, tl.zeros are such functions: a kernel calls
    them hundreds of times. Within one launch nothing restores those patches (the launch's own scope is
    restored at its end, the device calls' never), so the repeats re-install what is already installed.
    Skipped, with nothing changed, where the interpreter's code is not the one this was written for."""
    import inspect

    try:
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - triton missing or changed
        return False
    function, executor = getattr(interpreter, "InterpretedFunction", None), getattr(interpreter, "GridExecutor", None)
    try:
        expected = ("_patch_lang(self.fn)" in inspect.getsource(function.__call__)
                    and "_patch_lang(self.fn)" in inspect.getsource(executor.__call__))
    except (AttributeError, OSError, TypeError):
        expected = False
    if not expected:
        return False
    launch, run_grid = [0], executor.__call__

    def grid_call(self, *args, **kwargs):
        launch[0] += 1
        return run_grid(self, *args, **kwargs)

    def device_call(self, *args, **kwargs):
        if self.__dict__.get("_gsa_patched_in") != launch[0]:
            interpreter._patch_lang(self.fn)
            self._gsa_patched_in = launch[0]
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    executor.__call__, function.__call__ = grid_call, device_call
    return True


DEVICE_CALLS_PATCHED = _patch_interpreter_device_calls() if INTERPRETER else False


def _speed_up_interpreter_types(sanitize_overflow: bool):
    """Two more test-only interpreter patches for CI time (together ~2x on a forward+backward, the same bits):

    - `_get_np_dtype` rebuilds a dict of 18 numpy dtypes on every call (tens of thousands per kernel launch):
      memoised per element type;
    - the integer-overflow sanitizer (the interpreter's default) widens every int32 add, sub and mul to int64
      and asserts the range: off unless `sanitize_overflow` (GSA_SLOW_TESTS=1 keeps it on). The tests' shapes
      keep every index far below 2^31; offsets past it are checked on the GPU (bench/gpu_hardening.py
      big_offsets, long_sequence)."""
    import dataclasses

    import triton.language as tl
    from triton.runtime import interpreter
    original, builder = getattr(interpreter, "_get_np_dtype", None), getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if original is None or options is None or not hasattr(options, "sanitize_overflow"):
        return False
    table = {}

    def np_dtype(tt_dtype):
        element = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(element, tl.pointer_type):  # (unhashable; pointers are uint64 addresses)
            return original(element)
        try:
            return table[element]
        except KeyError:
            table[element] = found = original(element)
            return found

    interpreter._get_np_dtype = np_dtype
    builder.options = dataclasses.replace(options, sanitize_overflow=sanitize_overflow)
    return True


TYPES_PATCHED = _speed_up_interpreter_types(sanitize_overflow=RUN_SLOW) if INTERPRETER else False


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
