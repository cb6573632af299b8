#!/usr/bin/env bash
# One device-machine session: GPU tests, kernel bench, throughput benches. Logs go to $OUT.
# Usage: bash bench/gpu_session.sh STAGE...   (stages: env tests gtests kbench ksweep qwen llama llama256 peer prefix e2e e2emetrics structured tp diag)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
run() { local name=$1; shift; local t=$1; shift; echo "=== $name: $*" | tee -a "$OUT/summary.txt";
  local s=$(date +%s); timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?;
  echo "=== $name rc=$rc $(( $(date +%s) - s ))s" | tee -a "$OUT/summary.txt"; tail -n 25 "$OUT/$name.log"; }
for stage in "$@"; do case $stage in
  env) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/summary.txt"
       python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/summary.txt" ;;
  tests) run gpu_tests 420 python3 -m pytest -m gpu -x -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu_engine.py tests/test_sampler.py ;;
  gtests) run gpu_engine_tests 300 python3 -m pytest -m gpu -x -q -p no:cacheprovider tests/test_gpu_engine.py ;;
  kbench) run kernels 240 python3 bench/kernels.py --json "$OUT/kernels.json" ;;
  ksweep) run ksweep 300 python3 bench/kernels.py --sweep ;;
  qwen) run qwen3 400 python3 bench/throughput.py --shape qwen3-0.6b --num-requests 256 --prompt-len 100 1024 --output-len 100 1024 --json "$OUT/qwen3.json" ;;
  llama) run llama8b 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --json "$OUT/llama8b.json" ;;
  llama256) run llama8b_256 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --max-num-seqs 256 --json "$OUT/llama8b_256.json" ;;
  peer) run llama8b_peer 420 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --peer-only --json "$OUT/llama8b_peer.json" ;;
  prefix) run prefix_on 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prefix-len 1024 --prompt-len 16 64 --output-len 64 64 --json "$OUT/prefix_on.json"
          run prefix_off 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prefix-len 1024 --prompt-len 16 64 --output-len 64 64 --no-prefix-caching --json "$OUT/prefix_off.json" ;;
  e2e) run e2e 580 python3 bench/e2e.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --json "$OUT/e2e.json" ;;
  e2emetrics) for i in 1 2; do  # issue 13: the Redis path with metrics + job log off / on, alternated
      run e2e_off_$i 580 python3 bench/e2e.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --json "$OUT/e2e_off_$i.json"
      run e2e_on_$i 580 python3 bench/e2e.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --metrics-port 0 --scrape-every-s 5 --worker-log "$OUT/joblog_$i.log" --json "$OUT/e2e_on_$i.json"
    done ;;
  structured) for m in one distinct; do  # issue 11: a JSON schema on every request, vs llama above
      run llama8b_so_$m 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --structured $m --json "$OUT/llama8b_so_$m.json"
    done ;;
  serve) run serve_stream 300 python3 bench/serve_load.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --json "$OUT/serve_stream.json"
         run serve_plain 300 python3 bench/serve_load.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --no-stream --json "$OUT/serve_plain.json" ;;
  tp) # issue 14: tensor parallel over two GPUs (nvidia-h200-x2): the GPU tests, then tp=2 vs tp=1 on llama3-8b
      run tp_tests 420 python3 -m pytest -m gpu -x -q -p no:cacheprovider tests/test_tensor_parallel.py
      run llama8b_tp2 420 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --tensor-parallel-size 2 --json "$OUT/llama8b_tp2.json"
      run llama8b_tp1 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --json "$OUT/llama8b_tp1.json" ;;
  diag) run diag 300 python3 bench/diag_logits.py ;;
  *) echo "unknown stage $stage" ;;
esac; done
