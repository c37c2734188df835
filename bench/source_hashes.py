"""Cumulative sha256 of the generated kernel sources for a grid of Specs, for comparing two trees: run it with
PYTHONPATH on each and compare the lines (a line per mods set, cumulative over the sets before it).

    PYTHONPATH=. python bench/source_hashes.py            # none, qkv, gate_only, slot: ~5 min on 2 cores
    PYTHONPATH=. python bench/source_hashes.py none       # mod-free kernels only: ~1 min

12288 Specs x programs per mods set: 4 gate layouts x 4 chunk sizes x 4 dtypes x group 1/2 x varlen x
initial state x 4 (K, V, M), each of the 7 programs (forward, backward, decode).
"""
import hashlib, itertools, os, sys
os.environ.setdefault("TRITON_INTERPRET", "1")
import torch, torch.nn.functional as F
from gsa_compile import GSAMods, codegen, programs, programs_backward, programs_decode
from gsa_compile.spec import GateLayout, Spec

builders = list(programs.FORWARD_PROGRAMS) + list(programs_backward.BACKWARD_PROGRAMS) + [programs_decode.decode_step]
temperature = torch.ones(4)
MODS = {
    "none": "",
    "qkv": GSAMods(q_map=F.silu, k_map=F.relu, v_map=F.silu).key,
    "gate_only": GSAMods(gate_mod=lambda f: F.logsigmoid(f) / 8).key,
    "slot": GSAMods(slot_mod=lambda x, b, h, t, m: x / temperature[h]).key,
}
which = sys.argv[1:] or list(MODS)
total = hashlib.sha256()
n = 0
for name in which:
    for layout, cs, dtype, group, varlen, init, (K, V, M) in itertools.product(
            [GateLayout.SLOT, GateLayout.HEAD, GateLayout.DECAY_HEAD, GateLayout.DECAY_SLOT], [16, 32, 64, 128],
            ["float32", "bfloat16", "float16", "float64"], [1, 2], [False, True], [False, True],
            [(8, 8, 4), (128, 128, 64), (512, 512, 64), (100, 60, 33)]):
        spec = Spec(layout=layout, chunk_size=cs, dtype=dtype, K=K, V=V, M=M, group=group, varlen=varlen,
                    initial_state=init, final_state=True, mods=MODS[name])
        for b in builders:
            src = codegen.source(b, spec)
            total.update(src.encode()); n += 1
    print(name, n, total.hexdigest()[:16], flush=True)
