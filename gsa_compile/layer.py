"""`GatedSlotAttention`: the GSA token-mixing layer, on top of `chunk_gsa` and `recurrent_step`.

Constructor arguments and parameter names follow flash-linear-attention's layer
(fla/layers/gsa.py, fla-org/flash-linear-attention), so an fla GSA layer's state_dict loads:

    q_proj.weight [key_dim, hidden]                f_proj.weight [num_kv_heads * num_slots, hidden]
    k_proj.weight [key_dim / groups, hidden]       g_norm.weight [hidden]   (if elementwise_affine)
    v_proj.weight [value_dim / groups, hidden]     o_proj.weight [hidden, value_dim]
    {q,k,v}_conv1d.weight [D, 1, conv_size] (+ .bias with conv_bias)      if use_short_conv
    feature_map.layer.weight [head_k_dim, head_k_dim]                      if feature_map='t2r'

Per token (x the layer input, per head; G = num_heads / num_kv_heads query heads per kv head):

    q = phi(conv_q(x W_q)),  k = phi(conv_k(x W_k)),  v = silu(conv_v(x W_v))   (conv_*: identity
    f = logsigmoid(x W_f) / gate_logit_normalizer,   s = 1 - exp(f)               without short conv)
    o = GSA(q, k, v, s, g=f, scale)                   (per kv head states, shared by the G query heads)
    y = o_proj(RMSNorm(silu(o)))                      (RMSNorm over all value_dim channels at once)

phi is the feature map (swish | relu | t2r: relu(Linear)). With `fuse_mods=True` ("all") the
element-wise parts (phi's activation, silu of v, logsigmoid(f) / normalizer and s = 1 - exp(f)) are
not separate torch ops: they run inside the generated kernels as GSAMods (mods.py), on every load of
q, k, v and f, forward, backward and decode; padded tokens get f = +inf there (gate 0, s 0).
`fuse_mods="gate"` fuses only the gate and s (the maps run in torch). `fuse_mods=False` (the default)
runs them all in torch (same parameters, same results up to rounding). H200, bf16, hidden 2048
(bench/results/2026-11-29_h200_mods_s8_gate.json): "gate" makes the forward 1.7-3.7 % faster and
forward + backward 3-8 % slower; "all" makes the forward up to 1.25x slower at K = 512 (the mapped
q and k tiles double the output pass), so neither is the default. fla keeps
`use_output_gate`/`use_norm` as attributes but its forward ignores them (always silu + norm); so does this layer. fla's forward
calls `rms_norm_linear` without an eps, i.e. it always normalises with eps=1e-5; here g_norm uses
`norm_eps` (the two agree for the default norm_eps=1e-5).

Padding: `attention_mask` [B, L >= T] (1 = token, 0 = padding; the last T columns are used)
zeroes s and f at padded positions, so those tokens neither write nor decay the state, and zeroes
the short-conv inputs there; outputs at padded positions are 0. `cu_seqlens` packs sequences along T
(B = 1). Unlike fla (which repeats k, v, s, f per query head), the states live per kv head:
(hk [N, num_kv_heads, K, M], hv [N, num_kv_heads, M, V]).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .api import chunk_gsa, recurrent_step
from .mods import GSAMods

StatePair = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class GSACache:
    """One layer's decoding state after the tokens it has seen (N sequences).

    recurrent_state: (hk [N, Hkv, K, M], hv [N, Hkv, M, V]) float32, or None for "all zeros".
    conv_state: (q, k, v) short-conv windows [N, D, conv_size]: the last conv_size (masked,
      pre-activation) conv inputs of each sequence, oldest first, zeros before its start (fla's
      layout); None without short conv or before the first token.
    seen_tokens: tokens processed so far (the T of every forward call, padding included).

    `GatedSlotAttention.forward` never modifies a given cache: with use_cache=True it returns a new one.
    """
    recurrent_state: Optional[StatePair] = None
    conv_state: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
    seen_tokens: int = 0


class SwishFeatureMap(nn.Module):
    def forward(self, x):
        return F.silu(x)


class ReLUFeatureMap(nn.Module):
    def forward(self, x):
        return F.relu(x)


class T2RFeatureMap(nn.Module):
    """relu(Linear(x)) per head, with fla's parameter name `layer`."""

    def __init__(self, head_dim: int, dot_dim: Optional[int] = None, bias: bool = False):
        super().__init__()
        self.layer = nn.Linear(head_dim, dot_dim or head_dim, bias=bias)

    def forward(self, x):
        return F.relu(self.layer(x))


def log_forget_gate(f, normalizer):
    """The layer's gate_mod: logsigmoid(f) / gate_logit_normalizer (0 at f = +inf)."""
    return F.logsigmoid(f) / normalizer


FUSE_MODS = {False: "none", True: "all", "none": "none", "gate": "gate", "all": "all"}


def _fused_mods(fuse: str, feature_map: str, gate_logit_normalizer) -> Optional[GSAMods]:
    """The GSAMods of fuse_mods: None ("none"), the gate and s ("gate"), or also the maps ("all")."""
    if fuse == "none":
        return None
    gate_mod = functools.partial(log_forget_gate, normalizer=gate_logit_normalizer)
    if fuse == "gate":
        return GSAMods(gate_mod=gate_mod, s_from_gate=True)
    phi = F.silu if feature_map == "swish" else F.relu  # t2r: relu after its Linear, which runs in torch
    return GSAMods(q_map=phi, k_map=phi, v_map=F.silu, s_from_gate=True, gate_mod=gate_mod)


def _positions(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]):
    """(sequence index [B, T], offset inside the sequence [B, T]) of every token of x [B, T, ...]."""
    B, T = x.shape[:2]
    t = torch.arange(T, device=x.device)
    if cu_seqlens is None:
        return torch.arange(B, device=x.device)[:, None].expand(B, T), t[None, :].expand(B, T)
    seq = torch.searchsorted(cu_seqlens[1:].contiguous(), t, right=True)
    return seq[None, :], (t - cu_seqlens[seq])[None, :]


class ShortConvolution(nn.Conv1d):
    """Causal depthwise conv over time + optional silu, in plain torch (fla's ShortConvolution:
    an nn.Conv1d with groups=channels, weight [D, 1, W], optional bias [D]).

    y_t = act(bias + sum_{d<W} weight[:, 0, W-1-d] * x_{t-d}); inputs before a sequence's start come
    from its cache window [N, D, W] (newest last), or are zero. Returns (y [B, T, D], new window or None).
    """

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: Optional[str] = "silu"):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, bias=bias,
                         padding=kernel_size - 1)
        if activation not in (None, "silu", "swish"):
            raise ValueError(f"ShortConvolution activation must be 'silu', 'swish' or None, got {activation!r}")
        self.hidden_size, self.activation = hidden_size, activation

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, cache: Optional[torch.Tensor] = None,
                output_final_state: bool = False, cu_seqlens: Optional[torch.Tensor] = None):
        B, T, D = x.shape
        W = self.kernel_size[0]
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        seq, offset = _positions(x, cu_seqlens)
        weight = self.weight[:, 0, :]  # [D, W]
        y = x * weight[:, W - 1]
        for d in range(1, W):
            shifted = F.pad(x, (0, 0, d, 0))[:, :T]
            if cache is not None:  # x_{t-d} before the sequence start: cache[..., W - d + offset]
                earlier = cache[seq, :, (W - d + offset).clamp(max=W - 1)].to(x.dtype)  # [B, T, D]
            else:
                earlier = torch.zeros_like(shifted)
            y = y + torch.where((offset >= d)[..., None], shifted, earlier) * weight[:, W - 1 - d]
        if self.bias is not None:
            y = y + self.bias
        if self.activation is not None:
            y = F.silu(y)
        return y, (self._final_window(x, cache, cu_seqlens) if output_final_state else None)

    def _final_window(self, x, cache, cu_seqlens):
        B, T, D = x.shape
        W = self.kernel_size[0]
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        previous = cache.to(x.dtype) if cache is not None else x.new_zeros(N, D, W)
        if cu_seqlens is None:
            return torch.cat([previous, x.transpose(1, 2)], dim=2)[:, :, -W:].contiguous()
        starts, ends = cu_seqlens[:-1, None], cu_seqlens[1:, None]
        j = torch.arange(W, device=x.device)[None, :]
        pos = ends - W + j  # [N, W]: token index of window slot j
        from_x = x[0, pos.clamp(min=0)].transpose(1, 2)  # [N, D, W]
        from_cache = previous.gather(2, ((ends - starts) + j).clamp(max=W - 1)[:, None, :].expand(N, D, W))
        return torch.where((pos >= starts)[:, None, :], from_x, from_cache).contiguous()


class GatedSlotAttention(nn.Module):
    """Gated Slot Attention layer (Zhang et al. 2024) with fla's constructor and parameter names.

    forward(hidden_states [B, T, hidden], attention_mask=None, cache=None, use_cache=False,
    cu_seqlens=None) -> (output [B, T, hidden], GSACache or None). The chunked kernels run for
    training and prefill; `recurrent_step` runs when a cache is given, T <= `recurrent_max_len`, no
    cu_seqlens and no gradient is needed (mode='fused_recurrent': also without a cache, from a zero
    state).
    """

    recurrent_max_len = 4

    def __init__(self, mode: str = "chunk", hidden_size: int = 1024, expand_k: float = 1.0, expand_v: float = 1.0,
                 num_heads: int = 4, num_kv_heads: Optional[int] = None, use_short_conv: bool = False,
                 conv_size: int = 4, conv_bias: bool = False, num_slots: Optional[int] = None,
                 elementwise_affine: Optional[bool] = True, norm_eps: float = 1e-5, gate_logit_normalizer: int = 8,
                 feature_map: str = "swish", use_output_gate: bool = False, use_norm: bool = True,
                 layer_idx: Optional[int] = None, scale: Optional[float] = 1.0, chunk_size: Optional[int] = None,
                 fuse_mods=False, **kwargs):
        super().__init__()
        if mode not in ("chunk", "fused_recurrent"):
            raise NotImplementedError(f"mode {mode!r} is not supported: use 'chunk' or 'fused_recurrent'")
        self.mode, self.hidden_size = mode, hidden_size
        self.expand_k, self.expand_v = expand_k, expand_v
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        self.num_kv_groups = self.num_heads // self.num_kv_heads
        self.key_dim, self.value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        if self.key_dim % num_heads or self.value_dim % num_heads:
            raise ValueError(f"key_dim={self.key_dim} and value_dim={self.value_dim} must be multiples of "
                             f"num_heads={num_heads}")
        self.key_dim_per_group = self.key_dim // self.num_kv_groups
        self.value_dim_per_group = self.value_dim // self.num_kv_groups
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.use_short_conv, self.conv_size, self.conv_bias = use_short_conv, conv_size, conv_bias
        self.gate_logit_normalizer = gate_logit_normalizer
        self.use_output_gate, self.use_norm = use_output_gate, use_norm  # kept for fla parity; unused, as in fla
        self.scale = scale
        self.num_slots = self.head_k_dim if num_slots is None else num_slots
        self.layer_idx, self.chunk_size = layer_idx, chunk_size
        if fuse_mods not in FUSE_MODS:
            raise ValueError(f"fuse_mods must be False / 'none', 'gate' or True / 'all', got {fuse_mods!r}")
        self.fuse_mods = FUSE_MODS[fuse_mods]

        # registration order matches fla's, so state_dict keys come in the same order
        self.register_module("feature_map", None)
        if feature_map == "swish":
            self.feature_map = SwishFeatureMap()
        elif feature_map == "relu":
            self.feature_map = ReLUFeatureMap()
        elif feature_map == "t2r":
            self.feature_map = T2RFeatureMap(self.head_k_dim, self.head_k_dim)
        else:
            raise NotImplementedError(f"feature_map {feature_map!r} is not supported: use 'swish', 'relu' or 't2r'")
        self.mods = _fused_mods(self.fuse_mods, feature_map, gate_logit_normalizer)
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim_per_group, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim_per_group, bias=False)
        self.f_proj = nn.Linear(hidden_size, self.num_kv_heads * self.num_slots, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias, activation="silu")
            self.k_conv1d = ShortConvolution(self.key_dim_per_group, conv_size, bias=conv_bias, activation="silu")
            self.v_conv1d = ShortConvolution(self.value_dim_per_group, conv_size, bias=conv_bias, activation="silu")
        # fla sizes g_norm by hidden_size but applies it to the value_dim output (so fla needs
        # value_dim == hidden_size); sizing it by value_dim is the same whenever fla works.
        self.g_norm = nn.RMSNorm(self.value_dim, eps=norm_eps, elementwise_affine=bool(elementwise_affine))
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def _use_recurrent(self, T, cache, cu_seqlens, hidden_states) -> bool:
        if cu_seqlens is not None:
            return False
        if torch.is_grad_enabled() and (hidden_states.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False  # recurrent_step is inference-only
        if self.mode == "fused_recurrent":
            return True
        return cache is not None and T <= self.recurrent_max_len

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[GSACache] = None, use_cache: bool = False,
                cu_seqlens: Optional[torch.Tensor] = None, **kwargs) -> Tuple[torch.Tensor, Optional[GSACache]]:
        self._check_inputs(hidden_states, cache)
        B, T, _ = hidden_states.shape
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must be a 0/1 matrix [batch, >= seq_len] = [{B}, >= {T}] "
                                 f"(0 = padding), got shape {tuple(attention_mask.shape)}")
            if cu_seqlens is not None:
                raise ValueError("give either attention_mask or cu_seqlens, not both")
            mask = attention_mask[:, -T:]
        if cu_seqlens is not None and B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={B}")

        x = hidden_states
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv_state = None
        if self.use_short_conv:
            cq, ck, cv = cache.conv_state if cache is not None and cache.conv_state is not None else (None,) * 3
            q, cq = self.q_conv1d(q, mask=mask, cache=cq, output_final_state=use_cache, cu_seqlens=cu_seqlens)
            k, ck = self.k_conv1d(k, mask=mask, cache=ck, output_final_state=use_cache, cu_seqlens=cu_seqlens)
            v, cv = self.v_conv1d(v, mask=mask, cache=cv, output_final_state=use_cache, cu_seqlens=cu_seqlens)
            conv_state = (cq, ck, cv) if use_cache else None
        f = self.f_proj(x)
        q = q.reshape(B, T, self.num_heads, self.head_k_dim)
        k = k.reshape(B, T, self.num_kv_heads, self.head_k_dim)
        v = v.reshape(B, T, self.num_kv_heads, self.head_v_dim)
        f = f.reshape(B, T, self.num_kv_heads, self.num_slots)
        if self.fuse_mods == "all":  # the maps run inside the kernels (self.mods)
            if isinstance(self.feature_map, T2RFeatureMap):
                q, k = self.feature_map.layer(q), self.feature_map.layer(k)
        else:
            q, k, v = self.feature_map(q), self.feature_map(k), F.silu(v)
        if self.mods is not None:  # the gate and s run inside the kernels (self.mods)
            if mask is not None:  # padded tokens: gate_mod(+inf) = 0 (no decay) and s = 0 (no write)
                f = f.masked_fill(~mask[:, :, None, None].bool(), float("inf"))
            s, f = None, f.to(q.dtype)  # the kernels read f as s too
        else:
            f = F.logsigmoid(f) / self.gate_logit_normalizer
            s = (1 - f.exp()).to(q.dtype)
            if mask is not None:  # padded tokens neither write (s = 0) nor decay (f = 0) the state
                keep = mask[:, :, None, None].to(f.dtype)
                f, s = f * keep, s * keep.to(s.dtype)
        k, v = k.to(q.dtype), v.to(q.dtype)

        state = cache.recurrent_state if cache is not None else None
        if self._use_recurrent(T, cache, cu_seqlens, hidden_states):
            if state is None:
                H, K, M, V = self.num_kv_heads, self.head_k_dim, self.num_slots, self.head_v_dim
                state = (q.new_zeros(B, H, K, M, dtype=torch.float32), q.new_zeros(B, H, M, V, dtype=torch.float32))
            o, state = recurrent_step(q, k, v, s, f, self.scale, state=state, mods=self.mods)
        else:
            o, state = chunk_gsa(q, k, v, s, f, self.scale, initial_state=state, output_final_state=use_cache,
                                 cu_seqlens=cu_seqlens, chunk_size=self.chunk_size, mods=self.mods)

        o = self.o_proj(self.g_norm(F.silu(o.reshape(B, T, self.value_dim))))
        if mask is not None:
            o = o * mask[..., None].to(o.dtype)
        if not use_cache:
            return o, None
        seen = (cache.seen_tokens if cache is not None else 0) + T
        return o, GSACache(recurrent_state=state, conv_state=conv_state, seen_tokens=seen)

    def _check_inputs(self, hidden_states, cache):
        """ValueError/TypeError naming the argument (cu_seqlens and the cached states are checked by the ops)."""
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor [batch, seq_len, {self.hidden_size}], "
                            f"got {type(hidden_states).__name__}")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must have shape [batch, seq_len, hidden_size={self.hidden_size}], "
                             f"got {tuple(hidden_states.shape)}")
        if not hidden_states.is_floating_point():
            raise TypeError(f"hidden_states must be floating point, got {hidden_states.dtype}")
        weight = self.q_proj.weight
        if hidden_states.device != weight.device:
            raise ValueError(f"hidden_states is on {hidden_states.device} but the layer's parameters are on "
                             f"{weight.device}")
        if cache is not None and not isinstance(cache, GSACache):
            raise TypeError(f"cache must be a GSACache or None, got {type(cache).__name__}")

    def state_size(self) -> int:
        """Floats in one sequence's recurrent state (per kv head: K*M + M*V)."""
        return self.num_kv_heads * self.num_slots * (self.head_k_dim + self.head_v_dim)
