"""Every CUDA kernel of one chunk_gsa forward+backward with its time, by full name (torch.profiler; GPU only):

    python bench/kernel_table.py 8,2048,16,128,64        # B,T,H,D,M (K = V = D), bf16, slot gates
    python bench/kernel_table.py 4,4096,4,512,64 --trace trace.json

Session 12 took its gate-backward A/B from this table (`results/..._gatebwd_prof_*_s12.txt`). Unlike
benchmark.kernel_shares it keeps whole names, so torch's kernels are not folded together.
--trace FILE: instead, a torch.profiler trace with CPU activity and Python frames of 5 steps after 30 more: the
ops by self CPU time, and FILE as a Chrome trace (the host path between launches; session 16). The Python frames
inflate every host interval: compare gaps within one trace, not with untraced times."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from gsa_compile import benchmark as bm
from gsa_compile import chunk_gsa

B, T, H, D, M = (int(x) for x in sys.argv[1].split(","))
inputs = bm.make_inputs(B, T, H, D, D, M, "slot", torch.bfloat16, "cuda", requires_grad=True)
do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
step = bm._fwd_bwd(lambda: chunk_gsa(*inputs)[0], inputs, do)
trace = sys.argv[3] if sys.argv[2:3] == ["--trace"] else None
for _ in range(30 if trace else 3):
    step()
torch.cuda.synchronize()
if trace:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    prof.export_chrome_trace(trace)
    sys.exit(0)
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    step()
    torch.cuda.synchronize()
rows = sorted(((e.device_time_total / 1e3, e.count, e.key[:90]) for e in prof.key_averages() if e.device_time_total > 0),
              reverse=True)
print(f"shape {sys.argv[1]}: total {sum(r[0] for r in rows):.4f} ms")
for ms, n, key in rows:
    print(f"{ms:8.4f} ms {n:3d}x {key}")
