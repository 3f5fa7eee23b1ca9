#!/usr/bin/env bash
# Everything rrto_ros measures on a GPU host, in one go (results feed docs/benchmarks.md).
#   bench/gpu_all.sh OUT_DIR
# PY_SPY=/path/to/py-spy adds native-frame samples of the server to gpu_floor.
# Needs: python3 with torch (CUDA), pyzmq, numpy, scipy, lz4, zstandard on the path; run from
# the repository root.  Each step is bounded in time; a failing step does not stop the others.
set -u
out=${1:?usage: bench/gpu_all.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
py=python3
step() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | tail -40; }
nvidia-smi -L; $py -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
step tests 240 $py -m pytest -q -p no:cacheprovider test/test_gpu.py test/test_replay.py \
    test/test_preemption.py test/test_realtime_gpu.py test/test_split.py
step gpu_replay 150 $py -m bench.gpu_replay --iters 200 --out "$out/gpu_h100.json"
step preempt_latency 120 $py -m bench.preempt_latency --device cuda --duration 6 \
    --granularity whole block:3 ops:8 --out "$out/preempt_h100.json"
step sched_mix 300 $py -m bench.sched_mix --preset gpu --device cuda --duration 20 \
    --policies fifo priority preemptive preemptive+pack --theta 1.0 --solo --out "$out/sched_h100.json"
step overhead_cpu 120 $py -m bench.overhead --calls 500 --models tiny resnet18 \
    --out "$out/overhead_h100host_cpu.json"
step server_phases 200 $py -m bench.server_phases --device cuda --calls 400 \
    --archs keypoint_net mobilenet resnet18 --out "$out/server_phases_h100.json"
# the request path against its floors (issue 11): per model side by side, then end to end
step gpu_floor 300 $py -m bench.gpu_floor --device cuda --calls 300 \
    ${PY_SPY:+--py-spy "$PY_SPY"} --out "$out/gpu_floor_h200.json"
step gpu_e2e 200 $py -m bench.gpu_e2e --device cuda --calls 40 --out "$out/gpu_e2e_h200.json"
echo "== done"
