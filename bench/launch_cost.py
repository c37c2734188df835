"""Where one Triton launch's host time goes on this machine (GPU only; bench/NOTES.md "Session 16"):

    python bench/launch_cost.py [--shape B,T,H,D,M] [--calls 500]

For the gate pass and the output pass of one eager forward, at that call's own arguments, the median host
time of: the full launch (`kernel[grid](...)`: JITFunction.run), its argument binder and cache key, the
compiled kernel's launcher called directly with the bound arguments (what JITFunction.run ends in), the same
with every tensor replaced by its data pointer, and torch.empty of one [B, T, H, M] float32 buffer. The
default shape is small, so the GPU never holds the host back (each launch's kernel is shorter than its launch).
"""
import argparse
import statistics
import time

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import compute_cache_key

from gsa_compile import benchmark as bm
from gsa_compile import codegen, launch
from gsa_compile.spec import GateLayout

parser = argparse.ArgumentParser()
parser.add_argument("--shape", default="1,256,4,512,64", help="B,T,H,D,M (K = V = D)")
parser.add_argument("--calls", type=int, default=500)
cli = parser.parse_args()
B, T, H, D, M = (int(x) for x in cli.shape.split(","))
q, k, v, s, g = bm.make_inputs(B, T, H, D, D, M, "slot", torch.bfloat16, "cuda")
rows = []


def median_us(name, fn):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(cli.calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    rows.append((name, statistics.median(times) * 1e6))
    print(f"{name:60s} {rows[-1][1]:8.1f} us", flush=True)


seen, run = {}, launch.Call.run


def recording(self, builder, grid, *a, **extra):
    seen.setdefault(builder.__name__, (self, builder, grid, a, extra))
    return run(self, builder, grid, *a, **extra)


launch.Call.run = recording
launch.forward(q, k, v, s, g, D ** -0.5, None, None, None, 0, GateLayout.SLOT)
launch.Call.run = run
torch.cuda.synchronize()
for name in ("gate_pass", "output_pass"):
    call, builder, grid, args, extra = seen[name]
    fn = codegen.kernel(builder, call.spec)
    kwargs = dict(**call.mod_args, **extra, **call.consts[name], **call.launch_of.get(name, call.launch))
    median_us(f"{name} ({len(args)} arguments): full launch", lambda: fn[grid](*args, **kwargs))
    device = driver.active.get_current_device()
    kernel_cache, key_cache, _, _, binder = fn.device_caches[device]
    full = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    median_us(f"{name}: binder", lambda: binder(*args, **full))
    bound, specialization, options = binder(*args, **full)
    median_us(f"{name}: cache key", lambda: compute_cache_key(key_cache, specialization, options))
    kernel = kernel_cache[compute_cache_key(key_cache, specialization, options)]
    stream = driver.active.get_current_stream(device)
    median_us(f"{name}: get_current_device + stream", lambda: driver.active.get_current_stream(
        driver.active.get_current_device()))
    values = tuple(bound.values())
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    metadata = kernel.launch_metadata(grid3, stream, *values)
    launcher = kernel.run
    direct = (*grid3, stream, kernel.function, kernel.packed_metadata, metadata, None, None)
    median_us(f"{name}: kernel.launch_metadata", lambda: kernel.launch_metadata(grid3, stream, *values))
    median_us(f"{name}: launcher, bound arguments", lambda: launcher(*direct, *values))
    pointers = tuple(x.data_ptr() if isinstance(x, torch.Tensor) else x for x in values)
    median_us(f"{name}: launcher, data pointers for tensors", lambda: launcher(*direct, *pointers))
median_us(f"torch.empty [{B}, {T}, {H}, {M}] float32", lambda: torch.empty(B, T, H, M, device="cuda"))
median_us("x.data_ptr()", lambda: q.data_ptr())
print(f"{'(median host time per call; ' + torch.cuda.get_device_name() + ')':60s}")
