"""Two host-time diagnostics of session 13 (GPU only; bench/NOTES.md "Session 13"), beside host_profile.py:

    python bench/host_diagnostics.py [--shape B,T,H,D,M] [--single-thread]

1. Triton's launch path, piece by piece, for the gate pass and the output pass at the call's own arguments:
   JITFunction's argument binder and cache key (the C launcher's own time cannot be told apart from a full
   launch queue this way, so it is not printed).
2. Autograd's share: launch.backward with stubbed kernels on the main thread, on another thread, and inside
   a forward+backward (as autograd's device thread runs it), against a toy autograd.Function with the same
   five leaves (autograd's own cost on this machine). --single-thread runs the forward+backwards with
   torch.autograd.set_multithreading_enabled(False): the backward then runs on the calling thread.
"""
import argparse
import statistics
import threading
import time

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import compute_cache_key

from gsa_compile import benchmark as bm
from gsa_compile import chunk_gsa, codegen, launch
from gsa_compile.spec import GateLayout
from host_profile import stub_kernels  # (bench/, this script's directory, is on sys.path)

parser = argparse.ArgumentParser()
parser.add_argument("--shape", default="4,4096,4,512,64", help="B,T,H,D,M (K = V = D)")
parser.add_argument("--single-thread", action="store_true", help="autograd's backward on the calling thread")
cli = parser.parse_args()
B, T, H, D, M = (int(x) for x in cli.shape.split(","))
autograd_threads = lambda: torch.autograd.set_multithreading_enabled(not cli.single_thread)  # (one use each)
q, k, v, s, g = bm.make_inputs(B, T, H, D, D, M, "slot", torch.bfloat16, "cuda", requires_grad=True)
leaves, do = [q, k, v, s, g], torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
qd, kd, vd, sd, gd = (x.detach() for x in leaves)


def median_us(name, fn, calls=200):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    print(f"{name:58s} {statistics.median(times) * 1e6:8.1f} us", flush=True)


# 1. the launch path: record one forward's launches, then time the binder and key on their arguments
seen, run = {}, launch.Call.run
launch.Call.run = lambda self, builder, grid, *a, **extra: (seen.setdefault(builder.__name__, (self, builder, a, extra)),
                                                            run(self, builder, grid, *a, **extra))
launch.forward(qd, kd, vd, sd, gd, D ** -0.5, None, None, None, 0, GateLayout.SLOT)
launch.Call.run = run
for name in ("gate_pass", "output_pass"):
    call, builder, args, extra = seen[name]
    fn = codegen.kernel(builder, call.spec)
    kwargs = dict(**call.mod_args, **extra, **call.consts[name], **call.launch_of.get(name, call.launch), debug=False,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    _, key_cache, _, _, binder = fn.device_caches[driver.active.get_current_device()]
    median_us(f"{name} ({len(args)} arguments): binder", lambda: binder(*args, **kwargs))
    _, specialization, options = binder(*args, **kwargs)
    median_us(f"{name}: cache key", lambda: compute_cache_key(key_cache, specialization, options))

# 2. autograd's share, kernels stubbed (the host path alone)
stub_kernels()
real_backward, inside = launch.backward, []
backward = lambda: real_backward(do, None, None, qd, kd, vd, sd, gd, D ** -0.5, None, None, None, 0, GateLayout.SLOT)
median_us("launch.backward, stubbed, main thread", backward)
worker = threading.Thread(target=lambda: median_us("launch.backward, stubbed, another thread", backward))
worker.start()
worker.join()


def timed_backward(*a, **kw):
    start = time.perf_counter()
    result = real_backward(*a, **kw)
    inside.append(time.perf_counter() - start)
    return result


launch.backward = timed_backward
with autograd_threads():
    median_us(f"forward+backward, stubbed{' (single thread)' * cli.single_thread}",
              bm._fwd_bwd(lambda: chunk_gsa(*leaves)[0], leaves, do))
print(f"{'  of which launch.backward (inside autograd)':58s} {statistics.median(inside) * 1e6:8.1f} us")
launch.backward = real_backward
median_us("forward, stubbed", lambda: chunk_gsa(*leaves))
grads = [torch.empty_like(x) for x in leaves]


class Toy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *xs):
        ctx.save_for_backward(*xs)
        return torch.empty_like(xs[2])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d):
        return tuple(torch.empty_like(x) for x in grads)


with autograd_threads():
    median_us("toy autograd.Function forward+backward (5 leaves)", bm._fwd_bwd(lambda: Toy.apply(*leaves), leaves, do))
