"""Host side of the decode kernels (programs_decode.py): T tokens against float32 states updated in place,
in one launch per (sequence, kv head) or split NS ways over the state's rows (two launches)."""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from . import codegen, mods, programs_decode
from .launch import DTYPE_NAMES, LOG2E, _gate_strides, _sm_count, _strides, gate_for_kernels, unit_last_stride
from .overrides import decode_override
from .spec import GateLayout, Spec, block, cdiv, next_power_of_2

MAX_DECODE_SPLITS = 8
DECODE_SPLITS_ENV = "GSA_DECODE_SPLITS"  # force NS (tests, bench/decode_bench.py --splits); 1 = one-launch kernel



def decode_splits(n_heads: int, K: int, V: int, device, splits: Optional[int] = None) -> int:
    """NS, the programs per (sequence, kv head) of the split decode (programs_decode.decode_keys/values).

    `splits` (or the environment variable GSA_DECODE_SPLITS) forces it, clamped to [1, min(K, V)];
    otherwise 1 (the one-launch kernel) on the CPU, or where the N * H heads fill every SM, else the largest
    power of two <= min(8, max(2, SMs // (N * H)), V // 16, K // 16).
    H200, K = V = 512, M = 64, CUDA graphs: B=1 H=4 takes NS = 8 (0.0062 ms; NS 1: 0.0198;
    results/2026-11-29_h200_decode_s5_*.json); B=64 H=4 (256 heads, 132 SMs) NS = 1 with decode_tiles' 128-wide
    tiles and 8 warps: 0.0382 ms (NS 2: 0.0421 at its best tiles; results/2026-11-29_h200_decode_s8_configs.json).
    """
    if splits is None and os.environ.get(DECODE_SPLITS_ENV):
        splits = int(os.environ[DECODE_SPLITS_ENV])
    if splits is not None:
        return max(1, min(int(splits), K, V))
    if torch.device(device).type != "cuda":
        return 1
    sms = _sm_count(torch.device(device))
    if n_heads >= sms:
        return 1
    room = min(MAX_DECODE_SPLITS, max(2, sms // max(1, n_heads)), V // 16, K // 16)
    return 1 if room < 2 else 1 << (room.bit_length() - 1)


def decode_tiles(NS: int, BG: int, BM: int):
    """(BK, BV, warps) of the decode kernels (GSA_DECODE_CONFIG overrides). The one-launch kernel (NS = 1:
    many heads) streams the states in 128-row/column tiles with 8 warps, capped so that a tile's
    [BG, BK, BM] product holds at most 64 x 128 elements (the size timed); the split kernels keep the
    32-wide tiles and 4 warps they were timed with. H200, B=64 H=4 K=V=512 M=64, NS=1, CUDA graphs
    (results/2026-11-29_h200_decode_s8_configs.json): 32/32 w4 0.0549 ms, 64/64 w8 0.0402, 128/128 w4
    0.0390, 128/128 w8 0.0382 (a plain copy of the state bytes: 0.0350)."""
    if NS > 1:
        return 32, 32, 4
    tile = max(16, min(128, 8192 // (BG * BM)))
    return tile, tile, 8


def decode_(q, k, v, s, g, scale: float, hk, hv, layout: GateLayout, wrap: Callable = lambda kernel: kernel,
            mods_key: str = "", mod_params: Optional[torch.Tensor] = None, splits: Optional[int] = None):
    """T tokens against the states (hk [B,H,K,M], hv [B,H,M,V], float32, contiguous), updated in place.
    Returns o [B, T, HQ, V].

    NS = decode_splits(...) programs per (sequence, kv head): NS = 1 runs the one-program-per-head kernel
    (programs_decode.decode_step); NS > 1 the two-launch split decode (decode_keys, then decode_values;
    race analysis in programs_decode.py)."""
    q, k, v, s = unit_last_stride(q, k, v, s)
    g = gate_for_kernels(g, layout)
    B, T = q.shape[:2]
    HQ, K, H, V, M = (int(x) for x in (q.shape[2], q.shape[3], k.shape[2], v.shape[3], s.shape[3]))
    spec = Spec(layout=layout, chunk_size=16, dtype=DTYPE_NAMES[q.dtype], K=K, V=V, M=M, group=HQ // H,
                initial_state=True, final_state=True, mods=mods_key)
    traced = mods.lookup(mods_key)
    mod_args = {"mod_params": mod_params} if traced is not None and traced.n_params else {}
    o = torch.empty(B, T, HQ, V, device=q.device, dtype=q.dtype)
    NS = decode_splits(B * H, K, V, q.device, splits)
    args = (T, H, scale * LOG2E, *_strides(q), *_strides(k), *_strides(v), *_strides(s), *_gate_strides(g, layout),
            *_strides(o))
    BG = next_power_of_2(spec.group)
    BK, BV, warps = decode_override() or decode_tiles(NS, BG, spec.BM)
    consts = dict(K=K, V=V, M=M, G=spec.group, BG=BG, BK=block(cdiv(K, NS), BK), BV=block(cdiv(V, NS), BV),
                  BM=spec.BM, num_warps=warps)
    if NS == 1:
        wrap(codegen.kernel(programs_decode.decode_step, spec))[(B * H,)](
            q, k, v, s, g, hk, hv, o, *args, **mod_args, **consts)
        return o
    part = torch.empty(B * H, T, NS, spec.group, M, device=q.device, dtype=torch.float32)  # partial slot logits
    for builder in (programs_decode.decode_keys, programs_decode.decode_values):
        wrap(codegen.kernel(builder, spec))[(B * H, NS)](
            q, k, v, s, g, hk, hv, o, part, *args, NS=NS, **mod_args, **consts)
    return o
