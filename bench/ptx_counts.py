"""Static instruction counts of the generated kernels for sm_90, without a GPU (triton ships ptxas): the
kernels with bench/mods_bench.py's mods (silu q/k/v, logsigmoid(f)/8, s from the gate) against the same
Spec without mods. A proxy for what the mods add to each program, not a timing.

    python bench/ptx_counts.py --K 512 --chunk 64 --block 64 --warps 4 --stages 2   # shape 3's config
    python bench/ptx_counts.py --K 512 --chunk 32 --block 128 --warps 4 --stages 3  # shape 1 (tuned)
    python bench/ptx_counts.py --K 128 --chunk 32 --block 128 --warps 4 --stages 3  # shape 2 (tuned)

One JSON line per (program, mods): PTX instructions per thread (static: a loop body counts once, both
branches of the state pass count), transcendental ones (ex2/lg2/rcp/div.full), ptxas registers and spill
stores. `--mods gate` or `--mods qkv` keeps only those mods. About 2 minutes per config on 2 CPU cores.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # triton.compile for a GPU target

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from gsa_compile import GSAMods, codegen, programs, programs_backward  # noqa: E402
from gsa_compile.launch import kernel_constants  # noqa: E402
from gsa_compile.resources import signature  # noqa: E402
from gsa_compile.spec import GateLayout, Spec, TileConfig  # noqa: E402

MODS = {
    "all": dict(q_map=F.silu, k_map=F.silu, v_map=F.silu, gate_mod=lambda f: F.logsigmoid(f) / 8, s_from_gate=True),
    "gate": dict(gate_mod=lambda f: F.logsigmoid(f) / 8, s_from_gate=True),
    "qkv": dict(q_map=F.silu, k_map=F.silu, v_map=F.silu),
}
BUILDERS = {b.__name__: b for b in programs.FORWARD_PROGRAMS + programs_backward.BACKWARD_PROGRAMS}
TRANSCENDENTAL = ("ex2", "lg2", "rcp", "div.full", "div.approx", "sqrt", "rsqrt")


def counts(builder, spec, config):
    consts = kernel_constants(spec, config)[builder.__name__]
    fn = codegen.kernel(builder, spec)
    fn = fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)
    source = ASTSource(fn, signature(fn.arg_names, spec, consts),
                       constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=config.num_warps, num_stages=config.num_stages)).asm["ptx"]
    ptxas = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas"))[0]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        info = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                              text=True, check=False).stderr
    ops = [line.split()[0] for line in ptx.splitlines() if re.match(r"^\s+[a-z@][^;]*;", line)]
    return dict(instructions=len(ops), transcendental=sum(o.startswith(TRANSCENDENTAL) for o in ops),
                registers=int((re.findall(r"Used (\d+) registers", info) or [0])[0]),
                spill_bytes=int((re.findall(r"(\d+) bytes spill stores", info) or [0])[0]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--K", type=int, default=512, help="K = V")
    parser.add_argument("--M", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--block", type=int, default=64, help="BK = BV")
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--mods", choices=sorted(MODS), default="all")
    parser.add_argument("--programs", default="state_pass,output_pass,slot_backward,state_backward,key_backward")
    args = parser.parse_args()
    config = TileConfig(BK=args.block, BV=args.block, num_warps=args.warps, num_stages=args.stages)
    for label, key in (("none", ""), (args.mods, GSAMods(**MODS[args.mods]).key)):
        spec = Spec(layout=GateLayout.SLOT, chunk_size=args.chunk, dtype="bfloat16", K=args.K, V=args.K, M=args.M,
                    final_state=True, mods=key)
        for name in args.programs.split(","):
            print(json.dumps(dict(program=name, mods=label, **counts(BUILDERS[name], spec, config))), flush=True)


if __name__ == "__main__":
    main()
