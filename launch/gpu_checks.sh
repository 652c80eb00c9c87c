#!/usr/bin/env bash
# Issue 4's checks for a session with one GPU, in one go (meant to fit one 10-minute device call; not yet
# run on a GPU): the GPU tests (the packed forward, pooling and a whole job against fair-esm), then the
# benchmark of ESM-2 650M and 3B shapes in bf16 against fair-esm in fp32 and under bf16 autocast, on real
# phage proteins and on short proteins. Results go under $OUT (default gpu-results/) for docs/benchmarks.md.
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
{ date -u; nvidia-smi; python -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'; } \
    > "$out/machine.txt" 2>&1
python -m pytest -q tests/test_gpu.py > "$out/test_gpu.txt" 2>&1
python launch/make_reads.py --records 4000 --out "$out/reads.fasta" > /dev/null
for model in esm2_t33_650M_UR50D esm2_t36_3B_UR50D; do
    for fasta in ../shared/data/phage/tail_fiber.fasta "$out/reads.fasta"; do
        for fair_esm in "" --fair-esm-autocast; do
            # shellcheck disable=SC2086  # an empty $fair_esm is no argument at all
            python launch/benchmark.py --device cuda --dtype bf16 --model "random:$model" --fasta "$fasta" \
                --limit 800 --toks-per-batch 16384 --rounds 1 --workdir "$out/work_$model" $fair_esm \
                >> "$out/benchmark.jsonl" 2>> "$out/benchmark.err"
        done
    done
    rm -f "$out/work_$model"/*.pt "$out/work_$model"/*.h5
done
