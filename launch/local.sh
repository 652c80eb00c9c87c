#!/usr/bin/env bash
# Start esm_features under torchrun on this machine: one rank per GPU (one rank where there is no GPU),
# torchrun's restarts after transient faults, one log file per rank, rank 0 on the console.
#
#   launch/local.sh --model M --fasta F [F ...] --out OUT.h5 [other esm_features flags]
#
# Optional settings, from the environment:
#   NPROC          ranks on this machine (default: the GPUs torch sees, or 1 without GPUs)
#   MAX_RESTARTS   how often torchrun restarts all ranks after one failed (default: 2)
#   LOG_DIR        torchrun writes each rank's stdout and stderr below it (default: esm_features_logs)
#   PYTHON         the Python with esm-features installed (default: python3)
# For one machine of a multi-machine job (launch/slurm_nodes.sh sets these from Slurm):
#   NNODES         machines in the job (default: 1)
#   RDZV_ENDPOINT  host:port of the c10d rendezvous, on the first machine (needed when NNODES > 1)
#   RDZV_ID        the same name on every machine of one job (default: esm_features)
#
# Signals: SIGTERM and SIGINT stop the ranks at their next safe point (torchrun forwards them), and so
# does SIGUSR1 (Slurm's --signal), which torchrun alone would not forward: see launch/torchrun_agent.py.
# Restarts: the ranks of a restart get a key-value store of their own (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
# unless set): in the rendezvous store torchrun shares by default they find the addresses of the ranks
# before them and never connect (pytorch/pytorch#135712).
set -euo pipefail
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
nproc="${NPROC:-$("$python" -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
nnodes="${NNODES:-1}"
log_dir="${LOG_DIR:-esm_features_logs}"
mkdir -p "$log_dir"

if [[ "$nnodes" == 1 && -z "${RDZV_ENDPOINT:-}" ]]; then
  rendezvous=(--standalone)
else
  rendezvous=(--nnodes="$nnodes" --rdzv-backend=c10d
              --rdzv-endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port when NNODES > 1}"
              --rdzv-id="${RDZV_ID:-esm_features}")
fi

exec "$python" "$here/torchrun_agent.py" "${rendezvous[@]}" --nproc-per-node="$nproc" \
  --max-restarts="${MAX_RESTARTS:-2}" --log-dir="$log_dir" --redirects=3 --tee=3 --local-ranks-filter=0 \
  "$here/../extract/esm_features.py" "$@"
