#!/usr/bin/env bash
# One device-machine session: GPU tests, kernel bench, throughput benches. Logs go to $OUT.
# Usage: bash bench/gpu_session.sh STAGE...   (each stage is a case label below)
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
  tests) run gpu_tests 420 python3 -m pytest -m gpu -q -p no:cacheprovider tests/ ;;
  gtests) run gpu_engine_tests 300 python3 -m pytest -m gpu -x -q -p no:cacheprovider tests/test_gpu_engine.py ;;
  sotests) run gpu_async_grammar_tests 300 python3 -m pytest -m gpu -x -q -p no:cacheprovider tests/test_async_grammar.py ;;
  fp8tests) run gpu_fp8_tests 420 python3 -m pytest -m gpu -x -q -p no:cacheprovider tests/test_fp8_kv.py tests/test_gpu_fp8_kv.py ;;
  gaptrace) # where the GPU waits for the host in pure decode: phases labelled, idle gaps attributed, chrome traces
      L="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --skip-prefill-window"
      run trace_bf16 300 python3 bench/profile_step.py $L --trace "$OUT/tr_bf16" --json "$OUT/trace_bf16.json"
      run trace_fp8all 300 python3 bench/profile_step.py $L --quantization fp8 --kv-cache-dtype fp8 --trace "$OUT/tr_fp8" --json "$OUT/trace_fp8all.json"
      run trace_qwen3 300 python3 bench/profile_step.py --shape qwen3-0.6b --num-requests 256 --prompt-len 100 1024 --output-len 100 1024 --skip-prefill-window --trace "$OUT/tr_qwen3" --json "$OUT/trace_qwen3.json" ;;
  attnwl) run attn_wl 480 python3 bench/attn_workload.py --decode-sweep --json "$OUT/attn_wl.json" ;;
  newkvtests) run gpu_new_kv_tests 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py tests/test_fp8_kv.py -k "prefill or new_kv or mixed" ;;
  attnfp8) # fp8 decode tiles at the issue's shape and the workload's, and a prefill check (this session's candidates)
      run attn_fp8_b64 300 python3 bench/attn_workload.py --skip prefill --block-sizes 16 64 --decode-uniform 64 4096 --decode-configs 32,1,4 32,2,8 --json "$OUT/attn_fp8_b64.json"
      run attn_fp8_wl 300 python3 bench/attn_workload.py --skip prefill --block-sizes 16 64 --decode-configs 32,1,4 32,2,8 --json "$OUT/attn_fp8_wl.json" ;;
  llamafp8all64) run llama8b_fp8all_bs64 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --quantization fp8 --kv-cache-dtype fp8 --engine-arg block_size=64 --json "$OUT/llama8b_fp8all_bs64.json" ;;
  bs64prof) # fifth session: why block 64 runs fp8 weights + fp8 KV end to end slower although its kernels are faster
      L="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --quantization fp8 --kv-cache-dtype fp8"
      run prof_fp8all_bs16 240 python3 bench/profile_step.py $L --json "$OUT/prof_fp8all_bs16.json"
      run prof_fp8all_bs64 240 python3 bench/profile_step.py $L --engine-arg block_size=64 --json "$OUT/prof_fp8all_bs64.json" ;;
  bs64) # fifth session: block 64 end to end, with the JIT compiles inside each timed run reported
      W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256"
      run llama8b_fp8all_bs64 300 python3 bench/throughput.py $W --quantization fp8 --kv-cache-dtype fp8 --engine-arg block_size=64 --json "$OUT/llama8b_fp8all_bs64.json"
      run llama8b_bs64 300 python3 bench/throughput.py $W --engine-arg block_size=64 --json "$OUT/llama8b_bs64.json" ;;
  prefilltrace) # fifth session: where the mixed prefill steps wait (GPU busy ~80-90% of their wall), host time by phase
      L="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --decode-steps 5"
      run trace_pf_fp8all 300 python3 bench/profile_step.py $L --quantization fp8 --kv-cache-dtype fp8 --trace "$OUT/trpf" --json "$OUT/trace_pf_fp8all.json"
      run trace_pf_bf16 300 python3 bench/profile_step.py $L --trace "$OUT/trpf" --json "$OUT/trace_pf_bf16.json" ;;
  bs64pairs) # fifth session: block 16 (the default) / block 64, bf16 llama3-8b and qwen3-0.6b, same call
      W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256"
      Q="--shape qwen3-0.6b --num-requests 256 --prompt-len 100 1024 --output-len 100 1024"
      for bs in 16 64; do
        run llama8b_bs$bs 300 python3 bench/throughput.py $W --engine-arg block_size=$bs --json "$OUT/llama8b_bs$bs.json"
        run qwen3_bs$bs 400 python3 bench/throughput.py $Q --engine-arg block_size=$bs --json "$OUT/qwen3_bs$bs.json"
      done ;;
  timelines) # sixth session: a whole run's seconds by step kind and batch size (bench/step_timeline.py): where
      # qwen3-0.6b's ~6.4 s go beyond the kernels' ~5 s, and llama3-8b bf16's beside it
      run qwen3_timeline 400 python3 bench/throughput.py --shape qwen3-0.6b --num-requests 256 --prompt-len 100 1024 --output-len 100 1024 --timeline --json "$OUT/qwen3_timeline.json"
      run llama8b_timeline 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --timeline --json "$OUT/llama8b_timeline.json" ;;
  pwtests) run gpu_piecewise_tests 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_piecewise.py tests/test_gpu_engine.py ;;
  piecewise) # eighth session: steps with prompt tokens through piecewise CUDA graphs (default: size measured at
      # start-up) vs eager (piecewise_graph_tokens=0), alternated, qwen3-0.6b twice, llama3-8b bf16 once
      Q="--shape qwen3-0.6b --num-requests 256 --prompt-len 100 1024 --output-len 100 1024"
      W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256"
      for i in 1 2; do
        run qwen3_pw_$i 400 python3 bench/throughput.py $Q --json "$OUT/qwen3_pw_$i.json"
        run qwen3_eager_$i 400 python3 bench/throughput.py $Q --engine-arg piecewise_graph_tokens=0 --json "$OUT/qwen3_eager_$i.json"
      done
      run llama8b_pw 300 python3 bench/throughput.py $W --json "$OUT/llama8b_pw.json"
      run llama8b_eager 300 python3 bench/throughput.py $W --engine-arg piecewise_graph_tokens=0 --json "$OUT/llama8b_eager.json" ;;
  piecewise2) # eighth session: qwen3's step timeline, and the Redis path with interactive probes (their first
      # steps are small prompt steps, host-bound on llama3-8b too), piecewise graphs at the measured size vs none
      W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256"
      Q="--shape qwen3-0.6b --num-requests 256 --prompt-len 100 1024 --output-len 100 1024"
      run qwen3_pw_tl 400 python3 bench/throughput.py $Q --timeline --json "$OUT/qwen3_pw_tl.json"
      run qwen3_eager_tl 400 python3 bench/throughput.py $Q --timeline --engine-arg piecewise_graph_tokens=0 --json "$OUT/qwen3_eager_tl.json"
      run e2e_pw 580 python3 bench/e2e.py $W --json "$OUT/e2e_pw.json"
      run e2e_eager 580 python3 bench/e2e.py $W --piecewise-graph-tokens 0 --json "$OUT/e2e_eager.json" ;;
  e2epw) # eighth session: a second e2e pair, eager first this time
      W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256"
      run e2e_eager2 580 python3 bench/e2e.py $W --piecewise-graph-tokens 0 --json "$OUT/e2e_eager2.json"
      run e2e_pw2 580 python3 bench/e2e.py $W --json "$OUT/e2e_pw2.json" ;;
  ncuattn) # ninth session: Nsight Compute on the paged kernel (fp8 / bf16 decode at the workload's contexts and the
      # issue's shape, bf16 prefill 2048 with k/v_new), plus the compiled TTGIR/PTX of each variant
      S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats"
      S="$S --section ComputeWorkloadAnalysis --section InstructionStats --section SchedulerStats --section LaunchStats"
      for c in "decode-workload fp8" "decode-workload bf16" "decode fp8" "prefill bf16"; do set -- $c
        run ncu_$1_$2 240 ncu --clock-control none --profile-from-start off -k regex:'paged_attn|flash|attention|fmha' \
          $S python3 bench/profile_attn.py --case $1 --kv $2 --launches 1 --triton-dump "$OUT/ttgir_$1_$2"
      done ;;
  fp8v) # ninth session: fp8 V stored keys-fastest (spool.kernels.kv_layout) vs row-major, kernels then end to end, alternated
      run attn_fp8v 300 python3 bench/attn_workload.py --skip prefill --block-sizes 16 64 --warp-specialize \
        --json "$OUT/attn_fp8v.json"
      run attn_fp8v_issue 300 python3 bench/attn_workload.py --skip prefill --block-sizes 16 64 --warp-specialize \
        --decode-uniform 64 4096 --json "$OUT/attn_fp8v_issue.json"
      W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --quantization fp8 --kv-cache-dtype fp8"
      run llama8b_fp8all_rowV 300 python3 bench/throughput.py $W --json "$OUT/llama8b_fp8all_rowV.json"
      run llama8b_fp8all_keysV 300 python3 bench/throughput.py $W --fp8-v-keys-fastest --json "$OUT/llama8b_fp8all_keysV.json" ;;
  fp8v2) # tenth session: the llama3-8b fp8 weights + fp8 KV A/B, V keys-fastest (128-key tiles) vs row-major, two
      # alternated pairs, and the decode kernel at the issue's shape beside SDPA
      run attn_fp8v_issue 300 python3 bench/attn_workload.py --skip prefill --block-sizes 64 \
        --decode-uniform 64 4096 --json "$OUT/attn_fp8v_issue.json"
      W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --quantization fp8 --kv-cache-dtype fp8"
      for i in 1 2; do
        run llama8b_fp8all_rowV_$i 300 python3 bench/throughput.py $W --json "$OUT/llama8b_fp8all_rowV_$i.json"
        run llama8b_fp8all_keysV_$i 300 python3 bench/throughput.py $W --fp8-v-keys-fastest \
          --json "$OUT/llama8b_fp8all_keysV_$i.json"
      done ;;
  fp8kv64tests) run gpu_fp8_kv_tests 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_fp8_kv.py \
        tests/test_fp8_kv.py tests/test_gpu_piecewise.py ;;
  prefill8) # tenth session: prefill, fp8 V keys-fastest vs row-major (2048 new tokens after 0 / 2048 cached, a step)
      run attn_prefill 300 python3 bench/attn_workload.py --skip decode --block-sizes 64 --json "$OUT/attn_prefill.json" ;;
  probefirst) # tenth session: an interactive request's first step carries the bulk decodes (a candidate build) or
      # no bulk work (the previous build, copied to .old/head), bench/e2e.py on llama3-8b bf16, alternated
      W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256"
      i=0
      for b in new old old new; do
        i=$((i + 1)); if [ $b = new ]; then d=.; else d=.old/head; fi
        run e2e_${b}_$i 580 bash -c "cd $d && PYTHONPATH=\$PWD:/tmp/site python3 bench/e2e.py $W --json $OUT/e2e_${b}_$i.json"
      done ;;
  graphmem) # tenth session: the KV cache sized after the CUDA graphs' memory (a dry capture), decode graphs captured
      # without torch.cuda.graph's gc; this build against the previous one (.old/head), start-up lines in the logs
      W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256"
      run llama8b_new 300 python3 bench/throughput.py $W --json "$OUT/llama8b_new.json"
      run llama8b_old 300 bash -c "cd .old/head && PYTHONPATH=\$PWD:/tmp/site python3 bench/throughput.py $W --json $OUT/llama8b_old.json"
      run llama8b_fp8all_new 300 python3 bench/throughput.py $W --quantization fp8 --kv-cache-dtype fp8 \
        --json "$OUT/llama8b_fp8all_new.json"
      run qwen3_new 400 python3 bench/throughput.py --shape qwen3-0.6b --num-requests 256 --prompt-len 100 1024 \
        --output-len 100 1024 --json "$OUT/qwen3_new.json" ;;
  ncufp8) S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables"
      S="$S --section Occupancy --section WarpStateStats --section InstructionStats --section SchedulerStats"
      for bs in 16 64; do for kv in fp8 fp8-keysV; do
        run ncu_decode-workload_${kv}_bs$bs 200 ncu --clock-control none --profile-from-start off -k regex:'paged_attn' $S \
          python3 bench/profile_attn.py --case decode-workload --kv $kv --block-size $bs --launches 1
      done; done ;;
  ksweep8wl) # ninth session: decode tiles at the workload's contexts, block 64 (the default) and 16, fp8 V row-major
      # and keys-fastest (bf16 too)
      for bs in 64 16; do
        run attn_sweep_bs$bs 300 python3 bench/attn_workload.py --skip prefill --block-sizes $bs --decode-sweep \
          --json "$OUT/attn_sweep_bs$bs.json"
      done ;;
  attnws) # ninth session: warp-specialized KV loops (AttnConfig.warp_specialize) beside the default tiles, workload
      # shapes and the issue's decode shape (B=64 x 4096, vs SDPA)
      run attn_ws 420 python3 bench/attn_workload.py --warp-specialize --block-sizes 16 --json "$OUT/attn_ws.json"
      run attn_ws_issue 300 python3 bench/attn_workload.py --warp-specialize --block-sizes 16 64 --skip prefill \
        --decode-uniform 64 4096 --json "$OUT/attn_ws_issue.json" ;;
  rows) # twelfth session: a decode step's GEMMs by row count (512 vs 513-640), then whole decode steps at 512 and
    # 513 sequences (the 513th replays the 528-row graph; a probe beside a full bulk batch does the same)
    run gemm_rows 200 python3 bench/gemm_rows.py --json "$OUT/gemm_rows.json"
    for n in 512 513; do run decode_rows_$n 300 python3 bench/throughput.py --shape llama3-8b --num-requests $n \
      --prompt-len 128 128 --output-len 256 256 --max-num-seqs 528 --timeline --json "$OUT/decode_rows_$n.json"; done ;;
  rows2) # twelfth session: the GEMMs by row count again, CUDA-graph timed, three passes alternately up and down,
    # with cuBLAS (torch's default) and cuBLASLt
    for b in default cublaslt; do run gemm_rows_$b 200 python3 bench/gemm_rows.py --blas $b \
      --rows 480 496 504 511 512 513 520 528 544 --json "$OUT/gemm_rows_$b.json"; done ;;
  e2efp8) run e2e_fp8 580 python3 bench/e2e.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 \
    --output-len 256 256 --quantization fp8 --kv-cache-dtype fp8 --json "$OUT/e2e_fp8.json" ;;
  pftests) # thirteenth session: the Gluon prefill kernel (spool.kernels.prefill_hopper) against the reference, and
    # the Triton kernel's prompt-path tests now that prompt steps dispatch to it on Hopper
    run gpu_prefill_hopper_tests 420 python3 -m pytest -m gpu -x -q -p no:cacheprovider tests/test_prefill_hopper.py
    run gpu_prompt_tests 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py \
      -k "prefill or new_kv or mixed or width" ;;
  gdec) # sixteenth session: spool.kernels.decode_hopper (Gluon, fp8 decode through a TMA ring): its GPU tests, the
    # kernel at the issue's shape and the workload's contexts by ring depth beside the Triton kernel (CUDA graph
    # replays), and llama3-8b fp8 weights + fp8 KV end to end with decode rows on it and on the Triton kernel
    run gdec_tests 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_kv.py -k "hopper or decode"
    A="--skip prefill host --block-sizes 64 --decode-top 10 --gluon-decode-stages 2 3 4 --graphs"
    run gdec_b64 200 python3 bench/attn_workload.py $A --decode-uniform 64 4096 --json "$OUT/gdec_b64.json"
    run gdec_wl 200 python3 bench/attn_workload.py $A --json "$OUT/gdec_wl.json" ;;
  gdece2e) # sixteenth session: llama3-8b fp8 weights + fp8 KV, decode rows on decode_hopper and on the Triton kernel
    W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --quantization fp8"
    W="$W --kv-cache-dtype fp8"
    run gdec_e2e_gluon 240 python3 bench/throughput.py $W --json "$OUT/gdec_e2e_gluon.json"
    SPOOL_DECODE_KERNEL=triton run gdec_e2e_triton 240 python3 bench/throughput.py $W \
      --json "$OUT/gdec_e2e_triton.json" ;;
  final17) # seventeenth session's build: the GPU tier; fp8 decode with a sequence's KV heads launched side by side
    # (decode_hopper) against the previous build (.old/decode_hopper.py, when the call carries one) and the Triton
    # kernel; end to end, the three
    run gpu_tests 420 python3 -m pytest -m gpu -q -p no:cacheprovider tests/
    A="--skip prefill host --block-sizes 64 --decode-top 4 --graphs"
    W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --quantization fp8"
    W="$W --kv-cache-dtype fp8"
    old() { cp spool/kernels/decode_hopper.py /tmp/decode_hopper.py && cp .old/decode_hopper.py spool/kernels/; }
    new() { cp /tmp/decode_hopper.py spool/kernels/decode_hopper.py; }
    for i in 1 2; do  # alternated: this build, then the previous one
      run hf_b64_$i 120 python3 bench/attn_workload.py $A --decode-uniform 64 4096 --json "$OUT/hf_b64_$i.json"
      run hf_wl_$i 120 python3 bench/attn_workload.py $A --json "$OUT/hf_wl_$i.json"
      if [ -f .old/decode_hopper.py ]; then
        old
        run old_b64_$i 120 python3 bench/attn_workload.py $A --decode-uniform 64 4096 --json "$OUT/old_b64_$i.json"
        run old_wl_$i 120 python3 bench/attn_workload.py $A --json "$OUT/old_wl_$i.json"
        new
      fi
    done
    run hf_e2e 150 python3 bench/throughput.py $W --json "$OUT/hf_e2e.json"
    if [ -f .old/decode_hopper.py ]; then
      old; run old_e2e 150 python3 bench/throughput.py $W --json "$OUT/old_e2e.json"; new
    fi
    SPOOL_DECODE_KERNEL=triton run triton_e2e 150 python3 bench/throughput.py $W --json "$OUT/triton_e2e.json" ;;
  longfp8) # fifteenth session: prompts of 16,384 tokens (a second 8,192-token chunk after 8,192 fp8-cached ones),
    # fp8 weights + fp8 KV; prompt chunks on the Gluon kernel, on the Triton kernel, and on .old/prefill_hopper.py
    # (an earlier Gluon kernel, when the call carries one)
    W="--shape llama3-8b --num-requests 32 --prompt-len 16384 16384 --output-len 16 16 --max-model-len 16400"
    W="$W --quantization fp8 --kv-cache-dtype fp8"
    run long_fp8_gluon 240 python3 bench/throughput.py $W --json "$OUT/long_fp8_gluon.json"
    SPOOL_PREFILL_KERNEL=triton run long_fp8_tritonpf 240 python3 bench/throughput.py $W \
      --json "$OUT/long_fp8_tritonpf.json"
    if [ -f .old/prefill_hopper.py ]; then
      cp spool/kernels/prefill_hopper.py /tmp/prefill_hopper.py && cp .old/prefill_hopper.py spool/kernels/
      run long_fp8_gluon_old 240 python3 bench/throughput.py $W --json "$OUT/long_fp8_gluon_old.json"
      cp /tmp/prefill_hopper.py spool/kernels/prefill_hopper.py
    fi ;;
  attnpf) run attn_prefill 400 python3 bench/attn_workload.py --skip decode --quick --json "$OUT/attn_prefill.json" ;;
  llamapf) # the bulk workload with prompt chunks on the Gluon kernel and on the Triton kernel. The Gluon tiles:
    # $GLUON_PREFILL ("block_n,stages,ws"), else the fastest on attnpf's 16-prompt step, else the default
    W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256"
    G=${GLUON_PREFILL:-$(python3 bench/best_gluon_prefill.py "$OUT/attn_prefill.json")}
    echo "gluon prefill tiles: ${G:-default}" | tee -a "$OUT/summary.txt"
    SPOOL_GLUON_PREFILL=$G run llama8b_gluon 300 python3 bench/throughput.py $W --json "$OUT/llama8b_gluon.json"
    SPOOL_PREFILL_KERNEL=triton run llama8b_tritonpf 300 python3 bench/throughput.py $W \
      --json "$OUT/llama8b_tritonpf.json" ;;
  llamafp8pf) # as llamapf, with fp8 weights and fp8 KV
    W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256"
    W="$W --quantization fp8 --kv-cache-dtype fp8"
    run llama8b_fp8_gluon 300 python3 bench/throughput.py $W --json "$OUT/llama8b_fp8_gluon.json"
    SPOOL_PREFILL_KERNEL=triton run llama8b_fp8_tritonpf 300 python3 bench/throughput.py $W \
      --json "$OUT/llama8b_fp8_tritonpf.json" ;;
  kbench) run kernels 360 python3 bench/kernel_speeds.py --json "$OUT/kernels.json" ;;
  ksweep) run ksweep 420 python3 bench/kernel_speeds.py --sweep --skip prefill small ;;
  ksweep8) run ksweep8 300 python3 bench/kernel_speeds.py --sweep --kv-dtypes fp8 --skip prefill small --json "$OUT/ksweep8.json" ;;
  psweep) run psweep 480 python3 bench/kernel_speeds.py --prefill-sweep --skip decode small --json "$OUT/psweep.json" ;;
  qwen) run qwen3 400 python3 bench/throughput.py --shape qwen3-0.6b --num-requests 256 --prompt-len 100 1024 --output-len 100 1024 --json "$OUT/qwen3.json" ;;
  llama) run llama8b 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --json "$OUT/llama8b.json" ;;
  llamafp8all) run llama8b_fp8all 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --quantization fp8 --kv-cache-dtype fp8 --json "$OUT/llama8b_fp8all.json" ;;
  llamafp8kv) run llama8b_fp8kv 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --kv-cache-dtype fp8 --json "$OUT/llama8b_fp8kv.json" ;;
  llama256) run llama8b_256 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --max-num-seqs 256 --json "$OUT/llama8b_256.json" ;;
  peer) run llama8b_peer 420 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --peer-only --json "$OUT/llama8b_peer.json" ;;
  prefix) run prefix_on 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prefix-len 1024 --prompt-len 16 64 --output-len 64 64 --json "$OUT/prefix_on.json"
          run prefix_off 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prefix-len 1024 --prompt-len 16 64 --output-len 64 64 --no-prefix-caching --json "$OUT/prefix_off.json" ;;
  e2e) run e2e 580 python3 bench/e2e.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --json "$OUT/e2e.json" ;;
  asyncllama) for m in off on; do  # issue 17 item 4, llama3-8b only
      run llama8b_async_$m 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --async-scheduling $m --json "$OUT/llama8b_async_$m.json"
    done ;;
  tokso) # detokenized baseline and one json_schema on every request (issue 11), with this build's defaults
      run llama8b_tok 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --with-tokenizer --json "$OUT/llama8b_tok.json"
      run llama8b_so_one 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --structured one --json "$OUT/llama8b_so_one.json" ;;
  tokso3) # issue 11 item 6 with Llama 3's real vocabulary (.vocab/llama3.tiktoken at the repo root: never in git;
          # bench/tiktoken_tokenizer.py says where it comes from); each pair twice, alternated, to see the spread
      W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --tokenizer-file .vocab/llama3.tiktoken"
      for i in 1 2; do
        run llama8b_tok3_$i 300 python3 bench/throughput.py $W --json "$OUT/llama8b_tok3_$i.json"
        run llama8b_so3_one_$i 300 python3 bench/throughput.py $W --structured one --json "$OUT/llama8b_so3_one_$i.json"
      done ;;
  grammarhost) # the grammar's host cost on this host's CPUs (no GPU used): xgrammar per row, the engine's split step
      run grammar_step3 300 python3 bench/grammar_step.py --tokenizer-file .vocab/llama3.tiktoken --threads 1 8 --json "$OUT/grammar_step3.json"
      run host_so3 400 python3 bench/host_overhead.py --structured --schema bench --tokenizer-file .vocab/llama3.tiktoken --num-seqs 512 --steps 100 --async-scheduling on --device-ms 25 --json "$OUT/host_so3.json" ;;
  gpus1lite) W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256"  # issue 14 item 4, one pair
      run cli_plain 420 python3 bench/worker_cli.py $W --json "$OUT/cli_plain.json"
      run cli_gpus0 420 python3 bench/worker_cli.py $W --worker-args "--gpus 0" --json "$OUT/cli_gpus0.json" ;;
  async) for m in off on; do  # issue 17 item 4: async scheduling off / on, same session
      run llama8b_async_$m 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --async-scheduling $m --json "$OUT/llama8b_async_$m.json"
      run qwen3_async_$m 400 python3 bench/throughput.py --shape qwen3-0.6b --num-requests 256 --prompt-len 100 1024 --output-len 100 1024 --async-scheduling $m --json "$OUT/qwen3_async_$m.json"
    done ;;
  interactiveafter) run e2e_probes_after 580 python3 bench/e2e.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --json "$OUT/e2e_probes_after.json" ;;
  interactive) # issue 17 item 6: bulk + one interactive probe every 500 ms; before (no reserve, no swap) / after
      run e2e_probes_before 580 python3 bench/e2e.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --priority-reserve 0 --swap-space-bytes 0 --json "$OUT/e2e_probes_before.json"
      run e2e_probes_after 580 python3 bench/e2e.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --json "$OUT/e2e_probes_after.json" ;;
  interactivesplit) # issue 17 item 6, fourth session: mixed capped steps at 2048 / split steps at 4096 (the default since the seventh session)
      W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256"
      for i in 1 2; do
        run e2e_mixed2048_$i 580 python3 bench/e2e.py $W --interactive-split-steps off --interactive-prefill-tokens 2048 --json "$OUT/e2e_mixed2048_$i.json"
        run e2e_split4096_$i 580 python3 bench/e2e.py $W --interactive-split-steps on --interactive-prefill-tokens 4096 --json "$OUT/e2e_split4096_$i.json"
      done
      run e2e_split6144 580 python3 bench/e2e.py $W --interactive-split-steps on --interactive-prefill-tokens 6144 --json "$OUT/e2e_split6144.json" ;;
  e2emetrics) for i in 1 2; do  # issue 13: the Redis path with metrics + job log off / on, alternated
      run e2e_off_$i 580 python3 bench/e2e.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --json "$OUT/e2e_off_$i.json"
      run e2e_on_$i 580 python3 bench/e2e.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --metrics-port 0 --scrape-every-s 5 --worker-log "$OUT/joblog_$i.log" --json "$OUT/e2e_on_$i.json"
    done ;;
  structured) # issue 11: a JSON schema on every request vs none, all with the synthetic tokenizer (detokenized)
      run llama8b_tok 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --with-tokenizer --json "$OUT/llama8b_tok.json"
      for m in one distinct; do
      run llama8b_so_$m 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --structured $m --json "$OUT/llama8b_so_$m.json"
    done ;;
  serve) run serve_stream 300 python3 bench/serve_load.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --json "$OUT/serve_stream.json"
         run serve_plain 300 python3 bench/serve_load.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --no-stream --json "$OUT/serve_plain.json" ;;
  servesim) # CPU only, on the host's 16 cores: the same burst through spool serve to a stub engine paced as the H200 (no GPU)
         run serve_sim_stream 300 python3 bench/serve_load.py --sim --json "$OUT/serve_sim_stream.json"
         run serve_sim_plain 300 python3 bench/serve_load.py --sim --no-stream --json "$OUT/serve_sim_plain.json" ;;
  gpus1) W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256"
         for i in 1 2; do  # issue 14: `spool worker` as today vs under `--gpus 0` (one GPU, supervisor), alternated
           run cli_plain_$i 420 python3 bench/worker_cli.py $W --json "$OUT/cli_plain_$i.json"
           run cli_gpus0_$i 420 python3 bench/worker_cli.py $W --worker-args "--gpus 0" --json "$OUT/cli_gpus0_$i.json"
         done
         run cli_cuda0 420 python3 bench/worker_cli.py $W --device cuda:0 --json "$OUT/cli_cuda0.json" ;;
  serveinterval) n=0; for iv in 0 100; do  # issue 15: streamed through spool serve, stream interval 0 (every step) vs 100 ms (the default)
      run serve_stream_iv${iv}_$((++n)) 300 python3 bench/serve_load.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --stream-interval-ms $iv --json "$OUT/serve_stream_iv${iv}_$n.json"
    done ;;
  streamcost) run stream_cost 420 python3 bench/stream_cost.py --json "$OUT/stream_cost.json" ;;  # CPU only: on the device host's idle cores
  tp) # issue 14: tensor parallel over two GPUs (nvidia-h200-x2): the GPU tests, then tp=2 vs tp=1 on llama3-8b
      run tp_tests 420 python3 -m pytest -m gpu -x -q -p no:cacheprovider tests/test_tensor_parallel.py
      run llama8b_tp2 420 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --tensor-parallel-size 2 --json "$OUT/llama8b_tp2.json"
      run llama8b_tp1 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --json "$OUT/llama8b_tp1.json" ;;
  # Issue 16 on nvidia-h200-x2 (two GPUs; NVLink multicast left off), in three calls of < 10 min each:
  tp16a) # the GPU tier on two GPUs (the CUDA tensor-parallel tests run, with the llama3-8b-shape bf16 logits at
      # tp=2 against tp=1: a ~16 GB checkpoint written and loaded four times, a few minutes). One device call each:
      # a call may run 600 s
      run gpu_tests_2gpu 580 python3 -m pytest -m gpu -q -p no:cacheprovider tests/ ;;
  tp16a2) # llama3-8b at tp=1 and tp=2
      W="--shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256"
      run llama8b_tp1 300 python3 bench/throughput.py $W --json "$OUT/llama8b_tp1.json"
      run llama8b_tp2 300 python3 bench/throughput.py $W --tensor-parallel-size 2 --json "$OUT/llama8b_tp2.json" ;;
  tp16b) # llama3-70b (dummy bf16) at tp=2 on the bulk workload (target >= 2,000 tok/s), and where its steps go:
      # profile_step's "collectives (NCCL)" share of the unprofiled step (target <= 15%)
      W="--shape llama3-70b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --tensor-parallel-size 2"
      run llama70b_tp2 580 python3 bench/throughput.py $W --json "$OUT/llama70b_tp2.json"
      run prof_llama70b_tp2 580 python3 bench/profile_step.py $W --json "$OUT/prof_llama70b_tp2.json" ;;
  tp16c) # through Redis: `spool worker --gpus all --tensor-parallel-size 2` on llama3-70b (target >= 95% of
      # tp16b's offline figure), then llama3-8b at tp=1, one worker per GPU (--gpus all) against one (--gpus 0):
      # aggregate >= 1.9x, on the 512-request workload and on twice as many requests
      W="--num-requests 512 --prompt-len 128 1024 --output-len 256 256"
      run cli_llama70b_tp2 580 python3 bench/worker_cli.py --shape llama3-70b $W \
        --worker-args "--gpus all --tensor-parallel-size 2" --json "$OUT/cli_llama70b_tp2.json"
      run cli_llama8b_gpu0 420 python3 bench/worker_cli.py --shape llama3-8b $W --worker-args "--gpus 0" \
        --json "$OUT/cli_llama8b_gpu0.json"
      run cli_llama8b_gpus_all 420 python3 bench/worker_cli.py --shape llama3-8b $W --worker-args "--gpus all" \
        --expect-workers 2 --json "$OUT/cli_llama8b_gpus_all.json"
      W="--num-requests 1024 --prompt-len 128 1024 --output-len 256 256"
      run cli_llama8b_gpu0_1024 420 python3 bench/worker_cli.py --shape llama3-8b $W --worker-args "--gpus 0" \
        --json "$OUT/cli_llama8b_gpu0_1024.json"
      run cli_llama8b_gpus_all_1024 420 python3 bench/worker_cli.py --shape llama3-8b $W --worker-args "--gpus all" \
        --expect-workers 2 --json "$OUT/cli_llama8b_gpus_all_1024.json" ;;
  profile) run profile_bf16 300 python3 bench/profile_step.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --json "$OUT/profile_bf16.json" ;;
  profilefp8) run profile_fp8all 300 python3 bench/profile_step.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --quantization fp8 --kv-cache-dtype fp8 --json "$OUT/profile_fp8all.json" ;;
  profileso) run profile_so_one 300 python3 bench/profile_step.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --structured one --json "$OUT/profile_so_one.json" ;;
  kbench64) run kernels_bs64 360 python3 bench/kernel_speeds.py --block-size 64 --json "$OUT/kernels_bs64.json" ;;
  llama64) run llama8b_bs64 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --engine-arg block_size=64 --json "$OUT/llama8b_bs64.json" ;;
  ksweep8bs64) run ksweep8_bs64 300 python3 bench/kernel_speeds.py --sweep --kv-dtypes fp8 --skip prefill small --block-size 64 --json "$OUT/ksweep8_bs64.json" ;;
  fp8qtests) run gpu_fp8q_tests 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_quant.py tests/test_fp8_weights.py tests/test_kernels.py tests/test_fp8_kv.py tests/test_async_grammar.py ;;
  fp8qbench) run fp8quant_bench 200 python3 bench/kernel_speeds.py --skip decode prefill small --json "$OUT/fp8quant.json" ;;
  diag) run diag 300 python3 bench/diag_logits.py ;;
  fp8) # issue 17: FP8 weights: GPU tests, accuracy vs bf16/fp32 (llama3-8b shape, dummy weights), throughput (compare: llama)
    run fp8_tests 300 python3 -m pytest -m gpu -x -q -p no:cacheprovider tests/test_fp8_weights.py
    run fp8_accuracy 300 python3 bench/fp8_accuracy.py --shape llama3-8b --prompts 32 --steps 64 --json "$OUT/fp8_accuracy.json"
    run llama8b_fp8 300 python3 bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --quantization fp8 --json "$OUT/llama8b_fp8.json" ;;
  scalesim) run scale_sim 580 python3 bench/scale_sim.py --workers 1 2 4 8 12 --window-s 15 --json "$OUT/scale_sim.json" ;;  # CPU only (issue 15): the host's 16 cores let Redis saturate
  *) echo "unknown stage $stage" ;;
esac; done
