"""The conftest's interpreter patch: bf16 `tl.dot` must match torch under TRITON_INTERPRET=1."""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, ACC_IN: tl.constexpr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    if ACC_IN:
        acc = tl.load(c_ptr + rm[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc)
    else:
        acc = tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("acc_in", [False, True])
def test_dot_matches_torch(dtype, acc_in, device):
    gen = torch.Generator().manual_seed(0)
    M, N, K = 16, 32, 16
    a = torch.randn(M, K, generator=gen).to(dtype).to(device)
    b = torch.randn(K, N, generator=gen).to(dtype).to(device)
    c0 = torch.randn(M, N, generator=gen).to(device)
    c = c0.clone() if acc_in else torch.empty_like(c0)
    _dot_kernel[(1,)](a, b, c, acc_in, M, N, K)
    expected = a.float() @ b.float() + (c0 if acc_in else 0)
    torch.testing.assert_close(c, expected, rtol=1e-5, atol=1e-5)


def test_bf16_patch_installed(interpreter):
    from triton.runtime import interpreter as interp
    patched = getattr(interp.InterpreterBuilder.create_dot, "_gsa_bf16_patch", False)
    assert patched == interpreter
