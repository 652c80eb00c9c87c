#!/usr/bin/env bash
# Inside a Slurm job (an sbatch script): start launch/local.sh once on every node of the job with srun,
# the nodes meeting in a c10d rendezvous hosted on the first node. Used by the templates in slurm/.
#
#   launch/slurm_nodes.sh [more esm_features flags]
#
# Inputs, from the environment: FASTA (input file(s) or shell patterns, separated by spaces), MODEL
# (fair-esm name, .pt path or random:<name>), OUT (the .h5 file), EXTRA_ARGS (more esm_features flags;
# optional).
# From Slurm: SLURM_JOB_NODELIST (its first node hosts the rendezvous), SLURM_NNODES, SLURM_JOB_ID
# (the rendezvous id), SLURM_CPUS_PER_TASK (passed on to srun when set).
# Optional: RDZV_PORT (default: 20000 + SLURM_JOB_ID % 20000, so jobs sharing a node differ), and
# launch/local.sh's NPROC, MAX_RESTARTS, LOG_DIR (default: esm_features_logs/<job id>), PYTHON.
# Cluster settings, each unless already set: HDF5_USE_FILE_LOCKING=FALSE (Lustre, GPFS and NFS often
# refuse the locks HDF5 takes; ranks never write through HDF5 at the same time anyway), NCCL_DEBUG=WARN.
# Signals: srun passes SIGTERM, SIGINT and SIGUSR1 on to every node's torchrun (see launch/local.sh).
set -euo pipefail

: "${FASTA:?set FASTA to the input FASTA file(s), separated by spaces}"
: "${MODEL:?set MODEL to a fair-esm name, a .pt file or random:<name>}"
: "${OUT:?set OUT to the output .h5 file}"
read -r -a patterns <<< "$FASTA"
fasta=()
for pattern in "${patterns[@]}"; do
  # shellcheck disable=SC2206  # expand shell patterns such as reads_*.faa (sorted); no match stays as written
  fasta+=($pattern)
done
read -r -a extra <<< "${EXTRA_ARGS:-}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
export NNODES="$SLURM_NNODES"
export RDZV_ENDPOINT="${nodes[0]}:${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export RDZV_ID="$SLURM_JOB_ID"
export LOG_DIR="${LOG_DIR:-esm_features_logs/$SLURM_JOB_ID}"
export HDF5_USE_FILE_LOCKING="${HDF5_USE_FILE_LOCKING:-FALSE}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
  export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"  # srun no longer inherits sbatch's --cpus-per-task
fi

exec srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  "$here/local.sh" --model "$MODEL" --fasta "${fasta[@]}" --out "$OUT" "${extra[@]}" "$@"
