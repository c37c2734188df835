"""The generated kernels compile for sm_90 (Hopper) and fit its shared memory, without a GPU.

triton.compile for a GPU target cannot run in a process where TRITON_INTERPRET=1, so the check runs
in a subprocess with the interpreter off.
"""
import json
import os
import subprocess
import sys

SCRIPT = r"""
import json
from gsa_compile import programs, programs_backward, resources, segments
from gsa_compile.launch import kernel_constants
from gsa_compile.spec import GateLayout, Spec, TileConfig
spec = Spec(GateLayout.SLOT, 64, "bfloat16", 128, 128, 64, group=2, initial_state=True, final_state=True)
consts = kernel_constants(spec, TileConfig())
out = {}
for builder in programs.FORWARD_PROGRAMS + programs_backward.BACKWARD_PROGRAMS:
    fp = resources.footprint(builder, spec, consts[builder.__name__])
    out[builder.__name__] = [fp.shared_bytes, fp.fits]
for builder in (programs.segment_scan, programs.segment_scan_reverse):  # segments.scan's launch constants
    fp = resources.footprint(builder, spec, segments.scan_constants(consts["state_pass"], 8))
    out[builder.__name__] = [fp.shared_bytes, fp.fits]
print(json.dumps(out))
"""


def test_forward_and_backward_kernels_fit_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    footprints = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(footprints) == {"gate_pass", "state_pass", "output_pass", "slot_backward", "state_backward", "key_backward",
                               "segment_scan", "segment_scan_reverse"}
    for name, (shared, fits) in footprints.items():
        assert fits and 0 < shared <= 232448, (name, shared)
