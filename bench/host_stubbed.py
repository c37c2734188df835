"""Host time of eager calls with every kernel launch stubbed out (CPU tensors, no GPU needed): what our Python,
the allocations and autograd cost between launches, without Triton's launch path or the kernels.

    python bench/host_stubbed.py [--shape B,T,H,D,M] [--calls 300] [--profile]

Medians (and 10th percentiles) in us of: chunk_gsa's forward (inputs without grad), chunk_gsa's forward +
backward, launch.forward and launch.backward alone; --profile adds cProfile's top functions for the
forward+backward. The shape only sizes the buffers (nothing is computed); the numbers move with the machine
(on the 2-core CPU of session 17: medians ~170-270 us a forward, ~0.55-0.8 ms a forward+backward).
"""
import argparse
import cProfile
import pstats
import statistics
import time

import torch

from gsa_compile import benchmark as bm
from gsa_compile import chunk_gsa, codegen, launch
from gsa_compile.spec import GateLayout

parser = argparse.ArgumentParser()
parser.add_argument("--shape", default="2,256,4,64,64", help="B,T,H,D,M (K = V = D)")
parser.add_argument("--calls", type=int, default=300)
parser.add_argument("--profile", action="store_true")
args = parser.parse_args()
B, T, H, D, M = (int(x) for x in args.shape.split(","))


class StubKernel:
    """kernel[grid](*args, **kwargs) that launches nothing."""

    def __getitem__(self, grid):
        return lambda *a, **k: None


codegen.kernel = lambda builder, spec: StubKernel()
q, k, v, s, g = bm.make_inputs(B, T, H, D, D, M, "slot", torch.float32, "cpu", requires_grad=True)
leaves = (q, k, v, s, g)
plain = [x.detach() for x in leaves]
do = torch.randn(B, T, H, D)


def fwd_bwd():
    for x in leaves:
        x.grad = None
    o, _ = chunk_gsa(q, k, v, s, g, chunk_size=64)
    o.backward(do)


cases = {
    "chunk_gsa forward": lambda: chunk_gsa(*plain, chunk_size=64),
    "chunk_gsa forward+backward": fwd_bwd,
    "launch.forward": lambda: launch.forward(*plain, D ** -0.5, None, None, None, 64, GateLayout.SLOT),
    "launch.backward": lambda: launch.backward(do, None, None, *plain, D ** -0.5, None, None, None, 64,
                                               GateLayout.SLOT),
}
for name, fn in cases.items():
    for _ in range(30):
        fn()
    times = []
    for _ in range(args.calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    times.sort()
    print(f"{name:30s} median {statistics.median(times):8.1f} us   p10 {times[len(times) // 10]:8.1f} us", flush=True)
if args.profile:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.calls):
        fwd_bwd()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)
