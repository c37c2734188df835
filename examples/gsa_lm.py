"""A small GSA language model: embedding -> N x [RMSNorm, GatedSlotAttention, RMSNorm, MLP] -> head.

    python examples/gsa_lm.py [--steps 20] [--layers 2] [--hidden 32]

trains on a toy copy task for a few steps and greedily continues a prompt. Without a GPU the
kernels run in Triton's interpreter (slow: keep it tiny). Module names follow fla's GSA model
(embeddings, layers.i.{attn_norm, attn, mlp_norm, mlp.{gate_proj, up_proj, down_proj}}, norm, lm_head).

`generate` prefills the prompt with the chunked kernels (chunk_gsa) and continues token by token
with the recurrent decode kernel (recurrent_step) against each layer's GSACache.
"""
from __future__ import annotations

import argparse
import time
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gsa_compile import GatedSlotAttention, GSACache


class MLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, hidden_size: int, layer_idx: int, norm_eps: float = 1e-6, **attn_kwargs):
        super().__init__()
        self.attn_norm = nn.RMSNorm(hidden_size, eps=norm_eps)
        self.attn = GatedSlotAttention(hidden_size=hidden_size, layer_idx=layer_idx, norm_eps=norm_eps, **attn_kwargs)
        self.mlp_norm = nn.RMSNorm(hidden_size, eps=norm_eps)
        self.mlp = MLP(hidden_size, 4 * hidden_size)

    def forward(self, x, attention_mask=None, cache=None, use_cache=False):
        y, cache = self.attn(self.attn_norm(x), attention_mask=attention_mask, cache=cache, use_cache=use_cache)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), cache


class GSALM(nn.Module):
    def __init__(self, vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                 num_kv_heads: Optional[int] = None, num_slots: int = 8, norm_eps: float = 1e-6, **attn_kwargs):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(
            Block(hidden_size, i, norm_eps=norm_eps, num_heads=num_heads, num_kv_heads=num_kv_heads,
                  num_slots=num_slots, **attn_kwargs)
            for i in range(num_layers))
        self.norm = nn.RMSNorm(hidden_size, eps=norm_eps)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                caches: Optional[List[GSACache]] = None, use_cache: bool = False):
        """input_ids [B, T] -> (logits [B, T, vocab], per-layer caches or None)."""
        x = self.embeddings(input_ids)
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, attention_mask=attention_mask, cache=None if caches is None else caches[i],
                             use_cache=use_cache)
            new_caches.append(cache)
        return self.lm_head(self.norm(x)), (new_caches if use_cache else None)


def lm_loss(model: GSALM, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over tokens [B, T] (predict tokens[:, 1:] from tokens[:, :-1])."""
    logits, _ = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def train_step(model: GSALM, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, loss_fn=lm_loss) -> float:
    """One optimizer step on tokens [B, T]; `loss_fn` may be a torch.compile'd lm_loss. Returns the loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, tokens)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def generate(model: GSALM, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy decoding: prompt [B, T] -> [B, T + n_new].

    The prompt is prefilled with the chunked kernels (no cache yet), then every new token runs the
    recurrent decode kernel against the per-layer caches.
    """
    model.eval()
    logits, caches = model(prompt, use_cache=True)
    tokens = [prompt]
    for i in range(n_new):
        next_token = logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens.append(next_token)
        if i + 1 < n_new:
            logits, caches = model(next_token, caches=caches, use_cache=True)
    return torch.cat(tokens, dim=1)


def copy_task(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences 'a b c ... a b c ...': the second half repeats the first."""
    half = torch.randint(1, vocab, (batch, length // 2), generator=generator)
    return torch.cat([half, half], dim=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="torch.compile the loss (aot_eager on CPU)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = GSALM(args.vocab, args.hidden, args.layers, chunk_size=16).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = lm_loss
    if args.compile:
        loss_fn = torch.compile(lm_loss, fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
    for step in range(args.steps):
        start = time.perf_counter()
        loss = train_step(model, optimizer, copy_task(8, args.length, args.vocab, gen).to(device), loss_fn)
        print(f"step {step:3d}  loss {loss:.4f}  {time.perf_counter() - start:.2f}s")
    prompt = copy_task(1, args.length, args.vocab, gen)[:, : args.length // 2 + 2].to(device)
    out = generate(model, prompt, args.length // 2 - 2)
    print("prompt   ", prompt[0].tolist())
    print("generated", out[0, prompt.shape[1]:].tolist())


if __name__ == "__main__":
    main()
