#!/usr/bin/env bash
# Inside a Slurm job (an sbatch script): start launch/local.sh on every node of the job, the nodes meeting
# in a c10d rendezvous hosted on the first node. Used by the templates in slurm/.
#
#   launch/slurm_nodes.sh [more esm_features flags]
#
# Inputs, from the environment: FASTA (input file(s) or shell patterns, separated by spaces), MODEL
# (fair-esm name, .pt path or random:<name>), OUT (the .h5 file), EXTRA_ARGS (more esm_features flags;
# optional).
# From Slurm: SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_JOB_ID (the rendezvous id), SLURM_CPUS_PER_TASK
# (passed on to srun when set), SLURM_ARRAY_JOB_ID and SLURM_ARRAY_TASK_ID in an array task.
# Optional: RDZV_PORT (default: 20000 + SLURM_JOB_ID % 20000, so jobs sharing a node differ), and
# launch/local.sh's NPROC, MAX_RESTARTS, LOG_DIR (default: esm_features_logs/<job id>, in an array task
# esm_features_logs/<array job id>_<task id>, as the task's log is named), PYTHON.
# Cluster settings, each unless already set: HDF5_USE_FILE_LOCKING=FALSE (Lustre, GPFS and NFS often
# refuse the locks HDF5 takes; ranks never write through HDF5 at the same time anyway), NCCL_DEBUG=WARN.
#
# One node: local.sh runs here, in the batch script's own process tree, with no job step: a SIGTERM from
# Slurm (scancel, the time limit, preemption) reaches torchrun and its workers and nothing else, so they
# stop at their next safe point. Several nodes: srun starts local.sh on each; srun passes SIGUSR1 on to
# them, but answers SIGTERM by killing its tasks with SIGKILL (see docs/hpc-admin-guide.md).
# The rendezvous host is the first node's address as Slurm knows it (its NodeAddr), not its node name,
# which need not resolve.
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
job_name="$SLURM_JOB_ID"
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  job_name="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
fi
export LOG_DIR="${LOG_DIR:-esm_features_logs/$job_name}"
export HDF5_USE_FILE_LOCKING="${HDF5_USE_FILE_LOCKING:-FALSE}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command=("$here/local.sh" --model "$MODEL" --fasta "${fasta[@]}" --out "$OUT" "${extra[@]}" "$@")

if (( SLURM_NNODES == 1 )); then
  exec "${command[@]}"
fi

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
first_node="${nodes[0]}"
first_address="$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')"
export NNODES="$SLURM_NNODES"
export RDZV_ENDPOINT="${first_address:?Slurm gives no NodeAddr for node $first_node}:${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export RDZV_ID="$SLURM_JOB_ID"
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
  export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"  # srun no longer inherits sbatch's --cpus-per-task
fi
exec srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "${command[@]}"
