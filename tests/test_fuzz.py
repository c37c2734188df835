"""Hypothesis differential fuzz over the whole Spec space (tests/differential.py).

Each example draws a gate layout, chunk size (16-128), dtype (float32, float16, bfloat16), memory
layout of the inputs (contiguous, head_first, sliced, batch-expanded, last-dim strided), GQA group,
initial state, varlen packing, T around the chunk boundaries, where the upstream gradient
enters and the fused mods (maps, slot_mod, gate_mod, s_from_gate); o, the final states and the gradient of every input must match the float64 reference
within differential.TOLERANCE of the dtype. An interpreter example costs 1-4 s, so the "ci" profile
runs EXAMPLES examples (x10 under the "gpu" profile); bench/gpu_hardening.py runs the long GPU
fuzz over the same space and records its summary under bench/results/.
"""
from hypothesis import Phase, given, settings, strategies as st

import differential
from gsa_compile import ops as gsa_ops
from test_forward import _bf16_dot_ok

# ~60 s in CI (with conftest's interpreter patches); the GPU fuzz runs long
EXAMPLES = 12 * max(1, settings.default.max_examples // 20)
DTYPES = tuple(differential.DTYPES) if _bf16_dot_ok() else ("float32", "float16")


# No shrink phase: a rerun costs seconds in the interpreter; the failure message names the case.
@settings(max_examples=EXAMPLES, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(data=st.data())
def test_differential_fuzz(data, device):
    """chunk_gsa (forward and every gradient) against the float64 reference over the Spec space."""
    def pick(label, options):
        return data.draw(st.sampled_from(options), label=label)

    cap = differential.INTERPRETER_COST_CAP if gsa_ops.INTERPRETER else None
    case = differential.draw_case(pick, cost_cap=cap, dtypes=DTYPES)
    errors = differential.run_case(case, device)
    bad = differential.failures(case, errors)
    assert not bad, f"case {case}: above {differential.TOLERANCE[case['dtype']]}: {bad} (all errors {errors})"
