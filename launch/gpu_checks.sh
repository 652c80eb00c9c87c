#!/usr/bin/env bash
# Issue 4's checks on one GPU, in one device call (not yet run on a GPU): the GPU tests (the packed
# forward, pooling and a whole job against fair-esm), then ESM-2 3B and 650M shapes in bf16 against
# fair-esm in fp32 and under bf16 autocast, on short proteins and on real phage proteins. Results go
# under $OUT (default gpu-results/) for docs/benchmarks.md.
#
# The device machine has python3 with torch, numpy and h5py but neither fair-esm nor Biopython, and the
# ../shared beside this checkout does not travel there. Prepare both here, once, in the repo's root:
#   mkdir -p gpu-data && cp -r ../shared/data/phage gpu-data/ && echo /gpu-data/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d gpu-data/wheels fair-esm==2.0.0 biopython
# then run `bash launch/gpu_checks.sh` carrying gpu-data, with a time limit of DEADLINE_S (default 300 s)
# plus a minute. The steps run most important first, each only while the time left allows it, so that
# whatever ran comes back.
set -uo pipefail
out=${OUT:-gpu-results}
data=${GPU_DATA:-gpu-data}
deadline=${DEADLINE_S:-300}
python=${PYTHON:-python3}
work=$(mktemp -d)  # checkpoints of several GB and fair-esm's per-protein files: not under $out
export PYTHONUNBUFFERED=1 ESM_FEATURES_PHAGE_DIR=${ESM_FEATURES_PHAGE_DIR:-$data/phage}
mkdir -p "$out"

if [ ! -f "$ESM_FEATURES_PHAGE_DIR/tail_fiber.fasta" ]; then
    echo "gpu_checks: no phage proteins in $ESM_FEATURES_PHAGE_DIR; prepare gpu-data as this script's header says" >&2
    exit 2
fi
if compgen -G "$data/wheels/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
        "$data"/wheels/*.whl || exit 1
    export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ date -u; nvidia-smi; "$python" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'; } \
    > "$out/machine.txt" 2>&1

# step SECONDS_IT_MAY_TAKE NAME COMMAND...: runs COMMAND unless it could not finish before the deadline.
step() {
    local needs=$1 name=$2
    shift 2
    if (( SECONDS + needs > deadline )); then
        echo "skipped: $name (${SECONDS} s gone, it may take ${needs} s)" | tee -a "$out/steps.txt"
        return
    fi
    local started=$SECONDS rc
    "$@"
    rc=$?
    (( rc == 0 )) || failed=$(( failed + 1 ))
    echo "rc $rc: $name in $(( SECONDS - started )) s" | tee -a "$out/steps.txt"
}
failed=0

gpu_tests() {
    "$python" -m pytest -q -rs -p no:cacheprovider tests/jobs/test_gpu.py > "$out/test_gpu.txt" 2>&1
    local rc=$?
    if grep -q "skipped" "$out/test_gpu.txt"; then
        echo "gpu_checks: GPU tests were skipped (see test_gpu.txt)" >&2
        return 3
    fi
    return $rc
}

bench() {  # bench MODEL FASTA LIMIT [--fair-esm-autocast]
    "$python" launch/benchmark.py --device cuda --dtype bf16 --model "random:$1" --fasta "$2" --limit "$3" \
        --toks-per-batch 16384 --rounds 1 --workdir "$work/$1" "${@:4}" \
        >> "$out/benchmark.jsonl" 2>> "$out/benchmark.err"
}

step 90 "GPU tests" gpu_tests
reads=$work/reads.fasta  # six-frame translated reads: 50 to 170 residues
"$python" launch/make_reads.py --records 2000 --out "$reads" > /dev/null
phage=$ESM_FEATURES_PHAGE_DIR/tail_fiber.fasta
big=esm2_t36_3B_UR50D small=esm2_t33_650M_UR50D
# Most telling first: 3B on short proteins (its first run also writes the seeded 11 GB checkpoint).
step 120 "3B reads vs fair-esm bf16 autocast" bench $big "$reads" 2000 --fair-esm-autocast
step 90 "3B reads vs fair-esm fp32" bench $big "$reads" 2000
step 45 "650M reads vs fair-esm bf16 autocast" bench $small "$reads" 2000 --fair-esm-autocast
step 45 "650M phage vs fair-esm bf16 autocast" bench $small "$phage" 300 --fair-esm-autocast
step 75 "3B phage vs fair-esm bf16 autocast" bench $big "$phage" 300 --fair-esm-autocast
step 45 "650M reads vs fair-esm fp32" bench $small "$reads" 2000
step 45 "650M phage vs fair-esm fp32" bench $small "$phage" 300
step 90 "3B phage vs fair-esm fp32" bench $big "$phage" 300
rm -rf "$work"
(( failed == 0 )) || { echo "gpu_checks: $failed step(s) failed; see $out/steps.txt" >&2; exit 1; }
