#!/usr/bin/env bash
# The GPU steps of a session, each with its own time limit, so one device call can run several and
# return what each wrote: logs and JSON go to /tmp/gsa_steps (kept on the machine between calls while
# it stays warm) and are packed into $OUT/steps.tar.gz (the device tool returns at most 8 files).
# Run from the repository root on the GPU machine, e.g.
#
#   bash bench/gpu_session.sh fla_warm matrix fuzz      # call 1: nothing timed while fla warms
#   bash bench/gpu_session.sh tune_forward              # call 2 (fla done: it would skew the timings)
#   bash bench/gpu_session.sh tune_backward check       # call 3
#   bash bench/gpu_session.sh bench decode              # call 4
#   bash bench/gpu_session.sh mods model first_call     # call 5 (first_call empties the caches: last)
#
# fla steps need the wheels: carry .whl (see the device README); they are unpacked to /tmp/site.
# Steps (in the order bench/NOTES.md "Next GPU session" gives them):
#   matrix         bench/gpu_config_matrix.py --sanitize           the bf16 slot-tile fault
#   fla_warm       bench/fla_warm.py in the background (setsid)    fla's first-use autotuning, one process
#                  per shape of FLA_WARM_SHAPES (default: the 3 keys of the bench shapes and the model's);
#                  FLA_WARM_MODEL=1 adds one warming the example model's fla parts (model_bench --warm
#                  with MODEL_ARGS: its layer calls fla with other dtypes/keys than fla_warm.py; session 6)
#   fla_wait       wait (<= FLA_WAIT_S, 120 s) until every fla_warm process says `done`
#   fla_pack       fla's autotuning results (~/.triton/cache/*/*.autotune.json) into the pack, so a later
#                  machine skips the tuning: copy the tarball to bench/fla_autotune/ and commit it
#   fla_restore    bench/fla_autotune/$FLA_AUTOTUNE back into ~/.triton/cache (fla then compiles only its
#                  chosen configs; the hashes hold for this triton, fla and GPU only)
# Timed steps (tune_*, bench, decode, mods, model) first end any fla_warm still running: a background
# autotuning process on the same GPU skews every timing (session 5's bench ran beside one).
#   tune_forward   tune --ship --direction forward                 (autotune/*.json copied into the pack)
#   tune_backward  tune --ship --direction backward
#   check          bench/gpu_long_check.py on shapes 2 and 3 (B=1, T=4096, tuned configs) vs float64
#   bench          python -m gsa_compile bench (ours, fla, SDPA)   TRITON_CACHE_AUTOTUNING=1
#   first_call     empty caches, then bench/first_call.py           (after tune_*: no tuning at run time)
#   decode         bench/decode_bench.py --splits auto,1,2,4,8
#   segments_ab    bench/segments_bench.py $SEG_ARGS at the three bench shapes (segments_B{8,4,1}.json/.log)
#   mods           bench/mods_bench.py
#   model          bench/model_bench.py (ours vs fla layer); MODEL_ARGS="--hidden 2048" gives heads of
#                  K = V = 512, whose fla autotuning the pack already holds (the default's 256 it does not)
#   fuzz           bench/gpu_hardening.py --only fuzz, 240 s, 8 processes
#   hardening      bench/gpu_hardening.py (all GPU-only cases, then a 120 s fuzz): no longer fits one call cold
#   hardening_1    regressions long_sequence                        (session 11, cold: 218 + 80 s)
#   hardening_2    big_offsets big_offsets_backward                 (big_offsets ran past 150 s cold)
#   hardening_3    many_sequences graph_* determinism, a 90 s fuzz
#   hardening_all  hardening_1, _2 and _3 side by side (three processes, one call: none of them times);
#                  WITH_CHECK=1 runs `check` beside them (one `wait` for all: session 17 waited on a pgrep
#                  pattern that matched the calling shell's own command line and lost the call's limit)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
OUT=${OUT:-/tmp/gsa_out}
W=/tmp/gsa_steps
FLA_AUTOTUNE=${FLA_AUTOTUNE:-bench/fla_autotune/h200_triton3.6_fla0.6.0.tar.gz}
mkdir -p "$OUT" "$W"
start=$(date +%s)
fla_path() {
    if [ ! -d /tmp/site/fla ]; then
        mkdir -p /tmp/site && for w in .whl/*.whl; do python3 -m zipfile -e "$w" /tmp/site; done
    fi
    echo "/tmp/site:$PWD"
}
WARMERS='bench/fla_warm.py|model_bench.py --models fla --warm'  # (a pattern no calling command line should hold)
quiet_gpu() {  # end background fla_warm processes before anything is timed
    if pgrep -f "$WARMERS" > /dev/null; then
        echo "  ending fla warming still running (its tuning is lost): $(pgrep -fc "$WARMERS") processes"
        pkill -f "$WARMERS"; sleep 2
    fi
}
step() {  # step NAME LIMIT_S COMMAND...: run it, log to $W/NAME.log, print its tail
    local name=$1 limit=$2
    shift 2
    case $name in tune_*|bench|decode|mods|model|segments_*) quiet_gpu ;; esac
    echo "[$(( $(date +%s) - start )) s] $name (limit ${limit} s)"
    timeout "$limit" "$@" > "$W/$name.log" 2>&1
    echo "  exit $? after $(( $(date +%s) - start )) s"
    tail -n 25 "$W/$name.log" | cut -c1-300
}
for name in "$@"; do
    case $name in
        matrix) step matrix 300 python bench/gpu_config_matrix.py --sanitize --out "$W/matrix.json" ${MATRIX_ARGS:-} ;;
        fla_warm)
            n=0  # one process per fla autotuning key (H, K, V): shapes 1 and 3 share one
            shapes=${FLA_WARM_SHAPES:-4,4096,4,512,64 8,2048,16,128,64 8,2048,4,256,64}
            [ "$shapes" = none ] && shapes=""  # FLA_WARM_SHAPES=none: only the model (FLA_WARM_MODEL=1)
            for shape in $shapes; do
                n=$((n + 1))
                PYTHONPATH=$(fla_path) setsid nohup python bench/fla_warm.py --shapes "$shape" \
                    > /tmp/fla_warm_$n.log 2>&1 < /dev/null &
            done
            if [ -n "${FLA_WARM_MODEL:-}" ]; then  # fla's layer in the example model: its own kernels and keys
                n=$((n + 1))
                PYTHONPATH=$(fla_path) setsid nohup bash -c "python bench/model_bench.py --models fla --warm \
                    --budget 1200 ${MODEL_ARGS:-}; echo done" > /tmp/fla_warm_$n.log 2>&1 < /dev/null &
            fi
            echo "$n" > /tmp/fla_warm_count
            echo "fla_warm: $n processes in the background, logs /tmp/fla_warm_N.log" ;;
        fla_wait)
            for _ in $(seq "${FLA_WAIT_S:-120}"); do
                [ "$(cat /tmp/fla_warm_*.log 2>/dev/null | grep -c '^done')" -ge "$(cat /tmp/fla_warm_count)" ] && break
                sleep 1
            done
            tail -n 3 /tmp/fla_warm_*.log; cp /tmp/fla_warm_*.log "$W/" ;;
        fla_pack)
            (cd ~/.triton/cache && find . -name '*.autotune.json' | tar -czf "$W/fla_autotune.tar.gz" -T -)
            echo "packed $(tar -tzf "$W/fla_autotune.tar.gz" | wc -l) autotuning results" ;;
        fla_restore)
            mkdir -p ~/.triton/cache && tar -xzf "$FLA_AUTOTUNE" -C ~/.triton/cache
            echo "restored $(tar -tzf "$FLA_AUTOTUNE" | wc -l) autotuning results" ;;
        tune_forward)
            step tune_forward 540 python -m gsa_compile tune --ship --direction forward
            cp autotune/*.json "$W/" ;;
        tune_backward)
            step tune_backward 540 python -m gsa_compile tune --ship --direction backward
            cp autotune/*.json "$W/" ;;
        check)
            step check 400 bash -c "python bench/gpu_long_check.py --T 4096 --dims 16,128,128,64 --layouts slot \
                --dtypes bfloat16 --packed no --settings default --out $W/check_shape2.json && \
                python bench/gpu_long_check.py --T 4096 --dims 4,512,512,64 --layouts slot --dtypes bfloat16 \
                --packed no --settings default,off --out $W/check_shape3.json" ;;
        bench)  # BENCH_ARGS=--sweep adds T = 512 ... 65536 (plot it here from the JSON: benchmark.plot_sweep)
            step bench 560 env PYTHONPATH="$(fla_path)" python -m gsa_compile bench --out "$W/bench.json" ${BENCH_ARGS:-} ;;
        first_call)
            rm -rf ~/.triton/cache ~/.cache/gsa_compile
            step first_call 120 python bench/first_call.py 4,4096,4,512,512,64 ;;
        decode) step decode 240 env PYTHONPATH="$(fla_path)" python bench/decode_bench.py --splits auto,1,2,4,8 \
                    --out "$W/decode.json" ;;
        mods) step mods 300 python bench/mods_bench.py --out "$W/mods.json" ;;
        segments_ab)  # SEG_ARGS (e.g. --settings default,16 --variant base: --variant gw8:GSA_PROGRAM_WARPS=gate_pass=8)
            for shape in 8,2048,16,128,64 4,4096,4,512,64 1,32768,4,512,64; do  # files named by B (no commas)
                step "segments_B${shape%%,*}" 170 python bench/segments_bench.py --shape "$shape" ${SEG_ARGS:-} \
                    --out "$W/segments_B${shape%%,*}.json"
            done ;;
        model) step model 400 env PYTHONPATH="$(fla_path)" python bench/model_bench.py --budget 330 \
                   ${MODEL_ARGS:-} --out "$W/model.json" ;;
        fuzz) step fuzz 330 python bench/gpu_hardening.py --only fuzz --fuzz-seconds 240 --fuzz-jobs 8 \
                  --out "$W/fuzz.json" ;;
        hardening) step hardening 540 python bench/gpu_hardening.py --budget 500 --fuzz-seconds 120 --fuzz-jobs 8 \
                       --out "$W/hardening.json" ;;  # every case (limits sum to ~1800 s; s3-s6 took 60-80 s each)
        hardening_1) step hardening_1 540 python bench/gpu_hardening.py --budget 520 --only regressions long_sequence \
                         --out "$W/hardening_1.json" ;;
        hardening_2) step hardening_2 560 python bench/gpu_hardening.py --budget 550 --only big_offsets \
                         big_offsets_backward --out "$W/hardening_2.json" ;;
        hardening_3) step hardening_3 560 python bench/gpu_hardening.py --budget 550 --fuzz-seconds 90 --fuzz-jobs 8 \
                         --only many_sequences graph_backward graph_forward graph_decode determinism fuzz \
                         --out "$W/hardening_3.json" ;;
        hardening_all)
            echo "[$(( $(date +%s) - start )) s] hardening_all: hardening_1/2/3${WITH_CHECK:+ and check} side by side (limit 560 s)"
            for part in hardening_1 hardening_2 hardening_3 ${WITH_CHECK:+check}; do
                bash "$0" "$part" > "$W/hardening_all_$part.out" 2>&1 &
            done
            wait
            cat "$W"/hardening_all_*.out | grep -v '^packed' ;;
        *) echo "unknown step $name (see the header of bench/gpu_session.sh)"; exit 2 ;;
    esac
done
tar -czf "$OUT/steps.tar.gz" -C /tmp gsa_steps && echo "packed $W into $OUT/steps.tar.gz"
