"""Shared pieces of bench/gpu_hardening.py's cases: inputs on the device in the run's dtype, tolerances."""
from __future__ import annotations

import pathlib
import sys

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package and tests/differential.py (also in spawned workers)
import differential  # noqa: E402


CHUNK = 64
DIMS = dict(K=128, V=128, M=64)


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype():
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32  # bf16 dot is wrong in the interpreter


def rel(a, b):
    return differential.rel_err(a, b)


def _tolerance(name):
    return differential.tolerance("bfloat16" if _dtype() == torch.bfloat16 else "float32", name)


def make(B, T, HQ, H, K, V, M, seed=0, layout="slot", requires_grad=True, head_first=False):
    """Inputs on the device: q, k, v in the run's dtype, s in (0, 1) (logits for ABC), g = logsigmoid(randn)."""
    gen = torch.Generator(device=_device()).manual_seed(seed)
    dev, dtype = _device(), _dtype()

    def r(*shape):
        shape = (shape[0], shape[2], shape[1], *shape[3:]) if head_first and len(shape) == 4 else shape
        return torch.randn(*shape, generator=gen, device=dev)
    q, k, v = r(B, T, HQ, K), r(B, T, H, K), r(B, T, H, V)
    logits = r(B, T, H, M)
    s = logits if layout == "abc" else torch.sigmoid(logits)
    g = None if layout == "abc" else F.logsigmoid(r(B, T, H, M))
    out = [x.to(dtype) for x in (q, k, v, s)] + [None if g is None else g.to(dtype)]
    return [x if x is None or not requires_grad else x.requires_grad_() for x in out]


def _finite(*xs):
    return all(bool(torch.isfinite(x).all()) for x in xs if x is not None)


def _free():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
