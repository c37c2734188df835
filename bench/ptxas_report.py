"""Registers and spills of the generated kernels for sm_90 without a GPU: the host path runs on CPU
tensors with the launches recorded instead of run, each recorded launch is compiled by Triton for an
H100/H200 target and `ptxas -v` reports its registers and spill bytes.

    python bench/ptxas_report.py                       # the tuned configs of the three benchmark shapes
    python bench/ptxas_report.py --shape 8,2048,16,128,128,64 --config 32,128,128,4,3
    (~1 CPU-minute per shape: Triton compiles each kernel for sm_90a, as on the H200)

A kernel that spills at the tuned config is the first suspect of a slow pass (issue 6); the numbers are
the compiler's, not a measurement of time. Pointer and stride alignment is assumed (16-byte), as for
contiguous tensors on a GPU, so the code is the one a GPU launch specialises to.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # real @triton.jit functions (gsa_compile would set 1 without a GPU): compiled, never launched
os.environ.setdefault("GSA_SUBCHUNK", "sweep")  # the output pass a GPU runs (CPU tensors default to the pairwise form)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gsa_compile import benchmark, codegen, launch, launch_decode  # noqa: E402
from gsa_compile.spec import GateLayout, TileConfig  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64",
         torch.int32: "*i32", torch.int64: "*i64"}
TUNED = {  # autotune/NVIDIA_H200.json (session 8) for the benchmark shapes' forward: chunk, BK, BV, warps, stages
    (4, 4096, 4, 512, 512, 64): (32, 128, 128, 4, 3),  # the backward entries: the same for shapes 1 and 3,
    (8, 2048, 16, 128, 128, 64): (32, 64, 64, 4, 3),  # 16/64/64 w4 s3 for shape 2 (--config to see those)
    (1, 32768, 4, 512, 512, 64): (32, 128, 128, 4, 3),
}


def recorded_launches(shape, config, layout="slot", dtype=torch.bfloat16):
    """[(program name, jit function, args, kwargs)] of one forward, backward and decode step on small CPU tensors
    with the shape's K, V, M (T shortened: the kernels do not specialise on it)."""
    B, T, H, K, V, M = shape
    chunk, BK, BV, warps, stages = config
    launches, real = [], codegen.kernel

    class Recorder:
        def __init__(self, builder, spec):
            self.name, self.fn = builder.__name__, real(builder, spec)

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, self.fn, args, kwargs))

    codegen.kernel = Recorder
    try:
        q, k, v, s, g = benchmark.make_inputs(1, 2 * chunk, H, K, V, M, layout, dtype, "cpu")
        tiles = TileConfig(BK=BK, BV=BV, num_warps=warps, num_stages=stages)
        o, hk, hv = launch.forward(q, k, v, s, g, K ** -0.5, None, None, None, chunk, GateLayout(layout), tiles)
        launch.backward(torch.randn_like(o), None, None, q, k, v, s, g, K ** -0.5, None, None, None, chunk,
                        GateLayout(layout), tiles)
        states = hk.contiguous(), hv.contiguous()  # one decode token against the final states
        launch_decode.decode_(*(x[:, :1] for x in (q, k, v, s, g)), K ** -0.5, *states, GateLayout(layout), splits=1)
        launch_decode.decode_(*(x[:, :1] for x in (q, k, v, s, g)), K ** -0.5, *states, GateLayout(layout), splits=8)  # split
    finally:
        codegen.kernel = real
    return launches


def compile_report(fn, args, kwargs):
    """(registers, spill store bytes, spill load bytes, shared memory bytes) for sm_90a."""
    names = fn.arg_names
    constexprs = {n: kwargs[n] for n in names if n in kwargs and not isinstance(kwargs[n], torch.Tensor)}
    values = dict(zip(names, args), **{n: x for n, x in kwargs.items() if isinstance(x, torch.Tensor)})  # mods' buffers
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = values[name]
        if isinstance(value, torch.Tensor):
            signature[name] = TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = dict(num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 2))
    if kwargs.get("maxnreg"):  # GSA_MAXNREG's cap, as the launch passes it
        options["maxnreg"] = kwargs["maxnreg"]
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    report = subprocess.run([str(PTXAS), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                            capture_output=True, text=True).stderr
    os.unlink(f.name)
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, report)) else -1  # noqa: E731
    return (number(r"Used (\d+) registers"), number(r"(\d+) bytes spill stores"), number(r"(\d+) bytes spill loads"),
            compiled.metadata.shared)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", help="B,T,H,K,V,M (default: the three benchmark shapes)")
    parser.add_argument("--config", help="chunk,BK,BV,warps,stages (default: the shipped tuned config)")
    parser.add_argument("--layout", default="slot")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)
    parse = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    shapes = {parse(args.shape): parse(args.config) if args.config else TUNED.get(parse(args.shape), (64, 64, 64, 4, 2))} \
        if args.shape else TUNED
    print(f"{'shape':<26} {'config':<18} {'kernel':<16} {'launch':<10} {'regs':>5} {'spill st':>9} {'spill ld':>9} "
          f"{'smem':>7}")
    for shape, config in shapes.items():
        for name, fn, call_args, kwargs in recorded_launches(shape, config, args.layout, getattr(torch, args.dtype)):
            regs, stores, loads, smem = compile_report(fn, call_args, kwargs)
            own = f"w{kwargs.get('num_warps')}" + (f" BC{kwargs['BC']}" if "BC" in kwargs else "")
            print(f"{'B%d T%d H%d K%d V%d M%d' % shape:<26} {'%d/%d/%d w%d s%d' % config:<18} {name:<16} {own:<10} "
                  f"{regs:>5} {stores:>9} {loads:>9} {smem:>7}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
