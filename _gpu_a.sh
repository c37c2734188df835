#!/usr/bin/env bash
# GPU call A (session 4): re-tune for the merged kernels, time ours, profile the host path, segments.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
el tune; timeout 220 python -m gsa_compile tune --ship 2>&1 | tee $OUT/tune.txt | tail -15
cp autotune/NVIDIA_H200.json $OUT/ 2>/dev/null
el bench; timeout 200 python -m gsa_compile bench --out $OUT/bench.json 2>&1 | tail -30
el host; timeout 90 python bench/host_profile.py --shape 1,512,4,128,64 --calls 100 --out $OUT/host_small.json > $OUT/host_small.txt 2>&1; tail -4 $OUT/host_small.txt
timeout 60 python bench/host_profile.py --shape 4,4096,4,512,64 --calls 50 --out $OUT/host_shape1.json > $OUT/host_shape1.txt 2>&1; tail -4 $OUT/host_shape1.txt
el segments; timeout 150 python bench/segments_bench.py --settings off,4,8,16 --shape 1,32768,4,512,64 --out $OUT/segments.json 2>&1 | tail -12
el done
