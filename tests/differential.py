"""Differential testing of chunk_gsa against the float64 reference over the whole Spec space.

A case is a dict drawn by `draw_case(pick)`, where `pick(label, options)` returns one of `options`:
hypothesis in tests/test_fuzz.py (`data.draw(st.sampled_from(options), label=label)`), a seeded
`random.Random` where hypothesis is not installed. `explore(seconds, ...)` is the long fuzz that
bench/gpu_hardening.py runs on the GPU. This module imports neither pytest nor (at import) hypothesis.

The space: gate layout x chunk size x dtype x memory layout of the inputs x GQA x initial state x
varlen x T (1, inside the first chunk, whole chunks, past a boundary) x where the upstream gradient
enters (o, the final states, or both) x fused mods (none; feature maps; a slot_mod with a captured
per-head tensor; gate_mod on raw gate logits; gate_mod with s derived from the gate), where the
reference applies the same functions outside in float64, x the magnitude of q and k (1, or 300 with a
scale that keeps the logits O(1): q k^T past fp16's range). `run_case` makes leaf tensors in the case's
memory layout, runs chunk_gsa on them and recurrent_gsa on float64 copies of the same leaves (through the same
views), backpropagates the same random upstream gradients through both and returns the relative
error of every output and of every leaf's gradient.

Memory layouts (what chunk_gsa receives):
    contiguous      [B, T, H, D] tensors
    head_first      [B, H, T, D] tensors with head_first=True (every stride differs)
    sliced          x[..., 1:D+1] of a wider tensor: a larger row stride, a base pointer off alignment
    batch_expanded  k, v, s, g of batch 1 expanded over B (batch stride 0)
    strided_last    x[..., ::2]: a last-dimension stride of 2 (the one case that is copied)
"""
from __future__ import annotations

import os
import random
import time

import torch
import torch.nn.functional as F

from gsa_compile import GSAMods, chunk_gsa, recurrent_gsa
from gsa_compile.reference import per_token_gate, suffix_magnitudes

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYOUTS = ("slot", "head", "decay_head", "decay_slot", "abc")
CHUNK_SIZES = (16, 32, 64, 128)
MEMORY = ("contiguous", "head_first", "sliced", "batch_expanded", "strided_last")
# Relative errors (rel_err) allowed against the float64 reference: (outputs and final states; gradients
# of q, k, v, s and the initial states; the gradient of g, measured against the magnitude of its terms).
# float32: the kernels' round-off. float16/bfloat16: the reference sees the same rounded inputs, so what
# is left is the kernels' low-precision operands of tensor-core products (and, for bf16, chunk states
# kept in bf16: an fp32 initial state loses its low bits), and the rounding of the results themselves.
# dg is a reverse cumulative sum (for constant decays a sum over all tokens) of terms that largely
# cancel, each with a low-precision logit's error, so it is compared with the size of those terms.
# Observed worst on the CPU interpreter (~100 cases per dtype): fp16 3e-3 / 5e-4 / 1e-2, bf16 1.5e-2 /
# 1.4e-2 / 2e-2.
TOLERANCE = {"float32": (1e-5, 1e-4, 1e-4), "float16": (1e-2, 1e-2, 3e-2), "bfloat16": (3e-2, 5e-2, 1e-1)}
# Interpreter budget: (chunk rows) x (query heads) per case, as in test_backward.COST_CAP.
INTERPRETER_COST_CAP = {16: 16, 32: 8, 64: 4, 128: 2}
# Fused mods (gsa_compile.GSAMods): gate_mod needs a gate (not ABC), s_from_gate the slot layout.
MODS = ("none", "maps", "slot_mod", "gate_mod", "s_from_gate")
# Input magnitudes of q and k: 300 makes q k^T pass fp16's range (as test_fp16_large_values)
MAGNITUDES = (1, 1, 1, 300)
SMALL_DIMS = dict(K=(1, 5, 8, 13, 16, 24), V=(1, 3, 8, 11, 16, 19), M=(1, 3, 5, 8, 12))


def rel_err(a, b, floor=1e-2, scale=None):
    """||a - b|| / max(||scale||, floor * sqrt(numel)), in float64, scale = b by default: relative, except
    where the reference is (near) zero, with an RMS element below `floor`, where only round-off is left to
    compare (ABC at T = 1 without initial state: p is uniform and dq = dk = ds = 0 exactly; the kernel
    returns ~1e-8 of round-off, the float64 reference ~1e-16). For a sum, `scale` holds the summed
    magnitudes of its terms: where they cancel, the error of the sum is measured against the size of
    what cancelled."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    norm = b.norm().item() if scale is None else scale.detach().double().cpu().norm().item()
    return (a - b).norm().item() / max(norm, floor * max(b.numel(), 1) ** 0.5)


def draw_case(pick, cost_cap=None, max_t=150, dims=SMALL_DIMS, dtypes=tuple(DTYPES), chunk_sizes=CHUNK_SIZES,
              fixed=None):
    """One case of the Spec space. `cost_cap` (chunk size -> cap) bounds (chunk rows) x (query heads);
    `fixed` holds fields that are not drawn (e.g. the Spec fields, to vary only runtime sizes)."""
    fixed = fixed or {}

    def choose(label, options):
        return fixed[label] if label in fixed else pick(label, options)

    case = dict(chunk_size=choose("chunk_size", chunk_sizes), layout=choose("layout", LAYOUTS),
                dtype=choose("dtype", dtypes), memory=choose("memory", MEMORY))
    mods = choose("mods", MODS)
    if case["layout"] == "abc" and mods in ("gate_mod", "s_from_gate"):
        mods = "none"
    case["mods"] = "gate_mod" if mods == "s_from_gate" and case["layout"] != "slot" else mods
    C = case["chunk_size"]
    cap = float("inf") if cost_cap is None else cost_cap[C]
    regime = choose("regime", ("one", "below", "exact", "above"))
    T = {"one": 1, "below": None, "exact": C, "above": None}[regime]
    if regime == "below":
        T = choose("T_below", range(2, C))
    elif regime == "above":
        T = choose("T_above", range(C + 1, max(max_t, C + 1) + 1))
    while T > 1 and -(-T // C) > cap:  # the interpreter's budget: fewer tokens
        T = (T + 1) // 2
    varlen = choose("varlen", (False, True)) and T > 1
    if varlen:
        n_seq = choose("sequences", range(2, min(4, T) + 1))
        lengths, left = [], T
        for i in range(n_seq - 1):
            lengths.append(choose(f"length{i}", range(1, left - (n_seq - 1 - i) + 1)))
            left -= lengths[-1]
        lengths.append(left)
        case.update(B=1, cu_seqlens=[0] + [sum(lengths[:i + 1]) for i in range(n_seq)])
        rows = sum(-(-n // C) for n in lengths)
    else:
        case.update(B=choose("B", (1, 2) if -(-T // C) * 2 <= cap else (1,)), cu_seqlens=None)
        rows = case["B"] * -(-T // C)
    heads = [(h, g) for h in (1, 2) for g in (1, 2, 3) if rows * h * g <= cap] or [(1, 1)]
    case["H"], case["group"] = choose("heads", heads)
    case.update(T=T, K=choose("K", dims["K"]), V=choose("V", dims["V"]), M=choose("M", dims["M"]),
                initial_state=choose("initial_state", (False, True)),
                upstream=choose("upstream", ("both", "o", "final")), seed=choose("seed", range(2 ** 31)))
    magnitude = choose("magnitude", MAGNITUDES)
    if magnitude != 1:  # |q|, |k| ~ magnitude: q k^T far past fp16's 65504, the logits kept O(1) (v is not
        # scaled: with it, sums such as a per-slot decay's gradient over all tokens truly pass fp16's range)
        case.update(magnitude=magnitude, scale=case["K"] ** -0.5 / magnitude ** 2)
    return case


# ------------------------------------------------------------------------------------------------ inputs

def _values(case, gen):
    """Logical [B, T, H, D] values (float32, then rounded to the case's dtype) and the initial state."""
    B, T, H, K, V, M = (case[n] for n in ("B", "T", "H", "K", "V", "M"))
    HQ = H * case["group"]
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    big = case.get("magnitude", 1)
    x = dict(q=r(B, T, HQ, K) * big, k=r(B, T, H, K) * big, v=r(B, T, H, V))
    x["s"] = r(B, T, H, M) if case["layout"] == "abc" else torch.rand(B, T, H, M, generator=gen)
    gates = {"slot": lambda: F.logsigmoid(r(B, T, H, M)), "head": lambda: F.logsigmoid(r(B, T, H)),
             "decay_head": lambda: -torch.rand(H, generator=gen),
             "decay_slot": lambda: -torch.rand(H, M, generator=gen)}
    if case["layout"] in gates:
        x["g"] = gates[case["layout"]]()
        if case.get("mods") in ("gate_mod", "s_from_gate"):  # raw logits: the gate_mod maps them to log gates
            x["g"] = torch.randn(x["g"].shape, generator=gen) * 2
    if case.get("mods") == "s_from_gate":
        del x["s"]
    dtype = DTYPES[case["dtype"]]
    x = {n: t.to(dtype) for n, t in x.items()}
    N = B if case["cu_seqlens"] is None else len(case["cu_seqlens"]) - 1
    if case["initial_state"]:
        x.update(hk0=r(N, H, K, M), hv0=r(N, H, M, V))
    return x


def _place(name, x, memory, gen):
    """(leaf, view): the tensor that requires grad and a function giving the [B, T, H, D] view of a leaf
    (applied again to the float64 copy of the leaf for the reference)."""
    per_token = name in ("q", "k", "v", "s") or (name == "g" and x.dim() >= 3)
    if not per_token or memory == "contiguous":
        return x, lambda leaf: leaf
    if memory == "head_first":
        return x.transpose(1, 2).contiguous(), lambda leaf: leaf.transpose(1, 2)
    if memory == "batch_expanded":
        if name == "q":
            return x, lambda leaf: leaf
        return x[:1].contiguous(), lambda leaf: leaf.expand(x.shape[0], *leaf.shape[1:])
    noise = lambda n: torch.randn(*x.shape[:-1], n, generator=gen).to(x.dtype)  # noqa: E731
    D = x.shape[-1]
    if memory == "sliced":
        return torch.cat([noise(1), x, noise(2)], -1), lambda leaf: leaf[..., 1:D + 1]
    return torch.stack([x, noise(D)], -1).flatten(-2), lambda leaf: leaf[..., ::2]  # strided_last


def make_leaves(case, device):
    """(leaves, views): leaf tensors on `device` that require grad, and their view functions."""
    gen = torch.Generator().manual_seed(case["seed"])
    leaves, views = {}, {}
    for name, x in _values(case, gen).items():
        memory = case["memory"] if name not in ("hk0", "hv0") else "contiguous"
        leaf, view = _place(name, x, memory, gen)
        leaves[name], views[name] = leaf.to(device).requires_grad_(), view
    return leaves, views


# ------------------------------------------------------------------------------------------------ running

def case_mods(case, device):
    """The case's GSAMods (None for "none"): the same functions run fused in the kernels and, in float64,
    outside them for the reference."""
    kind = case.get("mods", "none")
    if kind == "none":
        return None
    if kind == "maps":
        return GSAMods(q_map=F.silu, k_map=lambda x: F.elu(x) + 1, v_map=F.relu)
    if kind == "slot_mod":  # a captured per-query-head temperature (a kernel argument) and soft-capping
        gen = torch.Generator().manual_seed(case["seed"] + 2)
        temperature = (torch.rand(case["H"] * case["group"], generator=gen) + 0.5).to(device)
        return GSAMods(slot_mod=lambda logit, b, h, t, m: 4 * torch.tanh(logit / temperature[h] / 4))
    return GSAMods(gate_mod=lambda f: F.logsigmoid(f) / 8, s_from_gate=kind == "s_from_gate")


def run_case(case, device="cpu"):
    """Errors (rel_err) of o, the final states and every leaf's gradient, chunk_gsa against recurrent_gsa."""
    return compare(case, *make_leaves(case, device))


def compare(case, leaves, views):
    """run_case on given leaves (q, k, v, s, optional g, hk0, hv0) and views; the case supplies chunk_size,
    memory, cu_seqlens, upstream, seed (for the upstream gradients) and optionally scale."""
    device = leaves["q"].device
    cu = None if case["cu_seqlens"] is None else torch.tensor(case["cu_seqlens"], dtype=torch.int32, device=device)
    head_first = case["memory"] == "head_first"
    want_final = case["upstream"] != "o"

    gate_terms = {}  # the reference's [B, T, H, M] per-token gate and s, whose gradients weigh dg's error
    mods = case_mods(case, device)
    fns = mods.functions if mods is not None else {}
    # [B, T, H, M]: s's shape, or g's where s is derived from it (s_from_gate: slot layout)
    shape = views["s"](leaves["s"]).shape if "s" in leaves else views["g"](leaves["g"]).shape

    def mapped_gate(g):  # the log gate the recurrence sees, per token
        return per_token_gate(g if fns.get("gate_mod") is None else fns["gate_mod"](g), shape)

    def call(fn, tensors, as_kernel):
        args = {n: tensors[n] if as_kernel and head_first else views[n](tensors[n]) for n in tensors}
        kwargs = dict(chunk_size=case["chunk_size"], head_first=head_first, mods=mods) if as_kernel else \
            dict(slot_mod=fns.get("slot_mod"))
        if not as_kernel:  # the mods outside the kernels, in float64
            for name in ("q", "k", "v"):
                if fns.get(f"{name}_map") is not None:
                    args[name] = fns[f"{name}_map"](args[name])
            if "g" in args:
                gate = mapped_gate(args["g"])
                if mods is not None and mods.s_from_gate:  # s from the gate, outside the gate's own term
                    args["s"] = 1 - torch.exp(gate)
                args["g"] = gate_terms["g"] = gate.clone()
                args["s"] = gate_terms["s"] = args["s"].clone()
        state = (args["hk0"], args["hv0"]) if "hk0" in args else None
        o, final = fn(args["q"], args["k"], args["v"], args.get("s"), args.get("g"), case.get("scale"),
                      initial_state=state, output_final_state=want_final, cu_seqlens=cu, **kwargs)
        return (o.transpose(1, 2) if as_kernel and head_first else o), final

    o, final = call(chunk_gsa, leaves, True)
    assert o.dtype == leaves["q"].dtype and (final is None) == (not want_final)
    ref_leaves = {n: x.detach().double().requires_grad_() for n, x in leaves.items()}
    o_ref, final_ref = call(recurrent_gsa, ref_leaves, False)
    errors = {"o": rel_err(o, o_ref)}
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    loss = loss_ref = 0
    # The upstream gradients are drawn in float64 and rounded to the output's dtype: autograd hands the kernels
    # that rounded gradient, so the reference gets the same one. (Unrounded, a sum that cancels, such as an fp16
    # dhv0 over 130 tokens of one slot, measured the rounding of do, not the kernels: 2e-2 against 2e-5.)
    if case["upstream"] != "final":
        do = upstream(o_ref.shape, gen, o.dtype, device)
        loss, loss_ref = (o.double() * do).sum(), (o_ref * do).sum()
    if want_final:
        for name, x, x_ref in zip(("hk", "hv"), final, final_ref):
            errors[name] = rel_err(x, x_ref)
            d = upstream(x_ref.shape, gen, x.dtype, device)
            loss, loss_ref = loss + (x.double() * d).sum(), loss_ref + (x_ref * d).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    wrt = list(ref_leaves.values()) + list(gate_terms.values())
    grads_ref = torch.autograd.grad(loss_ref, wrt, allow_unused=True)
    grads_ref = [torch.zeros_like(x) if b is None else b for x, b in zip(wrt, grads_ref)]
    grads = list(grads)
    for i, (name, a, b) in enumerate(zip(names, grads, grads_ref)):
        assert a.shape == leaves[name].shape and a.dtype == leaves[name].dtype, name
        grads[i], grads_ref[i], overflow_ok = without_true_overflow(a, b)
        errors[f"d{name}"] = rel_err(grads[i], grads_ref[i])
        errors[f"d{name}_finite"] = bool(torch.isfinite(grads[i]).all()) and overflow_ok
    if "g" in leaves:  # dg is a suffix sum of cancelling terms: weigh its error by their magnitudes
        dg_tokens, ds_tokens = grads_ref[-2:]
        terms = suffix_magnitudes(dg_tokens, gate_terms["s"] * ds_tokens, case["cu_seqlens"])
        if mods is not None and mods.s_from_gate:  # and the gate's path through s = 1 - e^g
            terms = terms + (torch.exp(gate_terms["g"]) * ds_tokens).abs()
        probe = ref_leaves["g"].detach().clone().requires_grad_()
        tokens = mapped_gate(views["g"](probe))  # through gate_mod: its derivative scales the terms
        magnitude, = torch.autograd.grad((tokens * terms.detach()).sum(), probe)
        errors["dg"] = rel_err(grads[names.index("g")], grads_ref[names.index("g")], scale=magnitude)
    finite_grads = [errors.pop(f"d{n}_finite") for n in names]  # every flag popped (all() would stop early)
    errors["finite"] = bool(torch.isfinite(o).all()) and all(finite_grads)
    return errors


def upstream(shape, gen, dtype, device):
    """A random upstream gradient, exactly representable in `dtype` (that of the output it belongs to), as float64."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).double().to(device)


def without_true_overflow(a, b):
    """(a, b, ok) with the elements where the float64 reference b itself is past a's dtype (b rounded to
    it is +-inf: an fp16 decay's gradient, a sum over every token, can exceed 65504) set to 0 in both, and
    ok = a holds exactly that infinity there (the correctly rounded result). Elsewhere nothing changes, so
    an infinity where the reference is finite is still a failure."""
    rounded = b.detach().to(device=a.device, dtype=a.dtype)
    beyond = torch.isinf(rounded)
    if not beyond.any():
        return a, b, True
    ok = bool((a.detach()[beyond] == rounded[beyond]).all())
    return a.detach().masked_fill(beyond, 0), b.detach().masked_fill(beyond.to(b.device), 0), ok


def tolerance(dtype, name):
    """The tolerance of one error of run_case: outputs (o, hk, hv), the gate gradient dg, other gradients."""
    out_tol, grad_tol, gate_tol = TOLERANCE[dtype]
    return gate_tol if name == "dg" else grad_tol if name.startswith("d") else out_tol


def failures(case, errors):
    """The errors above the case's dtype tolerance (and non-finite results), by name."""
    bad = {n: e for n, e in errors.items() if n != "finite" and not e <= tolerance(case["dtype"], n)}
    if not errors["finite"]:
        bad["finite"] = False
    return bad


# ------------------------------------------------------------------------------------------------ exploring

# Fields fixed for the runtime variants of one drawn Spec: they select the compiled kernels (the memory
# layout too, through the pointer alignment and stride specialisations), so variants reuse them.
SPEC_LABELS = ("chunk_size", "layout", "dtype", "memory", "K", "V", "M", "heads", "initial_state", "varlen", "mods")


def explore(seconds, device, seed=0, variants=3, specs=400, jobs=1, **options):
    """run_case over the Spec space until `seconds` pass (the long GPU fuzz of bench/gpu_hardening.py):
    per drawn Spec, `variants` runtime variants (T, B, packing, values, where the gradient enters), which
    reuse its compiled kernels. `options` go to draw_case. With jobs > 1 the Specs are shared among that
    many spawned processes (compiling is the bottleneck with cold caches; the cases are small); each
    process rewrites its share of the summary after every case, and one still compiling at the deadline
    (+ a grace of a quarter of `seconds`, at least 30 s) is ended, its finished cases kept.
    Returns a summary: Specs and cases tried, the worst errors per dtype, every case above its tolerance
    and every crash."""
    deadline = time.time() + seconds
    drawn, engine = _draw_specs(options, specs, seed)
    summary = dict(budget_seconds=seconds, engine=engine, jobs=jobs)
    if jobs <= 1:
        parts = [_explore_specs(drawn, device, deadline, variants, options)]
    else:
        parts = _explore_in_processes(drawn, device, deadline, variants, options, jobs, grace=max(30.0, seconds / 4))
        summary["processes_ended_at_deadline"] = sum(part.pop("ended", False) for part in parts)
    summary.update(_empty_summary())
    for part in parts:
        summary["specs"] += part["specs"]
        summary["failures"] += part["failures"]
        summary["crashes"] += part["crashes"]
        for dtype, row in part["by_dtype"].items():
            total = summary["by_dtype"].setdefault(dtype, dict(cases=0, worst_out=0.0, worst_grad=0.0, worst_dg=0.0))
            total.update({k: (total[k] + v) if k == "cases" else max(total[k], v) for k, v in row.items()})
        summary["cases"] += part["cases"]
    summary["ok"] = not summary["failures"] and not summary["crashes"] and summary["cases"] > 0
    return summary


def _empty_summary():
    return dict(specs=0, cases=0, by_dtype={}, failures=[], crashes=[])


def _explore_in_processes(drawn, device, deadline, variants, options, jobs, grace):
    """explore's shares in `jobs` spawned processes, each writing its summary to a file after every case."""
    import multiprocessing
    import pickle
    import tempfile
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        paths = [os.path.join(folder, f"share{i}.pickle") for i in range(jobs)]
        processes = [context.Process(target=_explore_share, args=(drawn[i::jobs], device, deadline, variants, options,
                                                                  path), daemon=True) for i, path in enumerate(paths)]
        for process in processes:
            process.start()
        parts = []
        for process, path in zip(processes, paths):
            process.join(max(0.0, deadline + grace - time.time()))
            ended = process.is_alive()
            if ended:  # compiling past the deadline: its finished cases are in the file
                process.kill()
                process.join()
            try:
                with open(path, "rb") as f:
                    part = pickle.load(f)
            except (OSError, EOFError, pickle.UnpicklingError):
                part = _empty_summary()
            if not ended and process.exitcode != 0:
                part["crashes"].append(dict(case=None, error=f"fuzz process exited with code {process.exitcode}"))
            parts.append(dict(part, ended=ended))
    return parts


def _explore_share(drawn, device, deadline, variants, options, path):
    """A spawned process's share of explore; its summary goes to `path` (pickled) after every case."""
    import pickle

    def save(summary):
        with open(path + ".tmp", "wb") as f:
            pickle.dump(summary, f)
        os.replace(path + ".tmp", path)
    _explore_specs(drawn, device, deadline, variants, options, after_case=save)


def _explore_specs(drawn, device, deadline, variants, options, after_case=lambda summary: None):
    """One process's share of explore: the drawn Specs in order until the deadline."""
    summary = _empty_summary()
    after_case(summary)
    for first, variant_seed in drawn:
        if time.time() > deadline:
            break
        rng = random.Random(variant_seed)
        fixed = {label: value for label, value in _labels(first).items() if label in SPEC_LABELS}
        summary["specs"] += 1
        for i in range(variants):
            if time.time() > deadline:
                break
            case = first if i == 0 else draw_case(lambda label, opts: rng.choice(opts), fixed=fixed, **options)
            try:
                errors = run_case(case, device)
            except Exception as error:  # noqa: BLE001 - a crash is a finding: record it and go on
                summary["crashes"].append(dict(case=case, error=f"{type(error).__name__}: {error}"[:500]))
                after_case(summary)
                continue
            _record(summary, case, errors)
            after_case(summary)
    return summary


def _labels(case):
    """A case's fields under the labels draw_case picks them by."""
    return {**case, "heads": (case["H"], case["group"]), "varlen": case["cu_seqlens"] is not None}


def _record(summary, case, errors):
    row = summary["by_dtype"].setdefault(case["dtype"], dict(cases=0, worst_out=0.0, worst_grad=0.0, worst_dg=0.0))
    row["cases"] += 1
    summary["cases"] += 1
    for name, error in errors.items():
        if name == "finite":
            continue
        key = "worst_dg" if name == "dg" else "worst_grad" if name.startswith("d") else "worst_out"
        row[key] = max(row[key], error)
    bad = failures(case, errors)
    if bad:
        summary["failures"].append(dict(case=case, above_tolerance=bad))


def _draw_specs(options, n, seed):
    """n (first case of a Spec, seed of its runtime variants), drawn by hypothesis when it is installed
    (drawing only: the cases then run until the deadline), else by random.Random(seed)."""
    drawn = []
    try:
        from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    except ImportError:
        rng = random.Random(seed)
        for _ in range(n):
            case = draw_case(lambda label, opts: rng.choice(opts), **options)
            drawn.append((case, rng.randrange(2 ** 31)))
        return drawn, "random"

    @settings(max_examples=n, deadline=None, database=None, phases=(Phase.generate,),
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def draw(data):
        case = draw_case(lambda label, opts: data.draw(st.sampled_from(opts), label=label), **options)
        drawn.append((case, data.draw(st.integers(0, 2 ** 31 - 1), label="variants")))
    draw()
    return drawn, "hypothesis"
