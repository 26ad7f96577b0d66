# shellcheck shell=bash disable=SC2034  # the scripts that source this file use the arrays it sets
# Shared by the sbatch scripts in slurm/ (sourced, not run): runtime choice, bind mounts, provenance,
# signal forwarding and requeue. Settings, all environment variables with defaults:
#   SFT_RUNTIME     auto | apptainer | singularity | none   auto: apptainer, else singularity.
#                   none: no container, run the `sft` and `torchrun` found on PATH (a venv; what the tests use),
#                   else those of the .venv next to slurm/ (`make venv`).
#   SFT_IMAGE       container image                                                 (default: sft.sif)
#   SFT_DATA_DIR    project data, read-only at /data and at its own path            (default: ./data, if present)
#   SFT_ENV_FILE    .env (DATA_PATH, tokens), read-only at /secrets/.env, --env-file (default: ./.env, if present)
#   SFT_OUTPUT_DIR  where run directories go, read-write at /outputs, output.dir=   (default: ./runs)
#   SFT_CACHE_DIR   caches, read-write at /cache; HF_HOME is its huggingface/       (default: ./.cache)
#   SFT_BINDS       more binds, comma-separated, apptainer syntax (src[:dst[:ro]]), e.g. a config outside ./
# "./" is the directory sbatch was called from. The container paths are the image's bind contract
# (docs/container.md); apptainer also binds $HOME and ./ itself, which is how configs/ is found.

SFT_RUNTIME="${SFT_RUNTIME:-auto}"
SFT_IMAGE="${SFT_IMAGE:-sft.sif}"
sft_submit_dir="${SLURM_SUBMIT_DIR:-$PWD}"
sft_venv_bin="$(realpath -m "$(dirname "${BASH_SOURCE[0]}")/../.venv/bin")"  # SFT_RUNTIME=none, sft not on PATH
SFT_DATA_DIR="$(realpath -m "${SFT_DATA_DIR:-$sft_submit_dir/data}")"
SFT_ENV_FILE="$(realpath -m "${SFT_ENV_FILE:-$sft_submit_dir/.env}")"
SFT_OUTPUT_DIR="$(realpath -m "${SFT_OUTPUT_DIR:-$sft_submit_dir/runs}")"
SFT_CACHE_DIR="$(realpath -m "${SFT_CACHE_DIR:-$sft_submit_dir/.cache}")"
# Slurm does not set this; without it torch starts one thread per core of the node, not of the allocation.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

sft_started=$SECONDS

# sft_setup: fill SFT_RUN (runs the image's entrypoint, i.e. `sft ARGS`), SFT_EXEC (runs any command in the
# image; empty without a container), SFT_OPTS (options for `sft train`, which go before the config) and
# SFT_OVERRIDES (key=value overrides, which go after it).
sft_setup() {
  local container=""
  case "$SFT_RUNTIME" in
    auto) container="$(command -v apptainer || command -v singularity || true)"
          if [[ -z "$container" ]]; then
            echo "sft: error: neither apptainer nor singularity is on PATH; load its module" \
                 "(e.g. module load apptainer) or set SFT_RUNTIME=none to use an installed sft" >&2
            exit 2
          fi ;;
    apptainer|singularity) container="$(command -v "$SFT_RUNTIME")" || {
            echo "sft: error: SFT_RUNTIME=$SFT_RUNTIME but $SFT_RUNTIME is not on PATH" >&2; exit 2; } ;;
    none) ;;
    *) echo "sft: error: SFT_RUNTIME=$SFT_RUNTIME; use auto, apptainer, singularity or none" >&2; exit 2 ;;
  esac
  mkdir -p "$SFT_OUTPUT_DIR" "$SFT_CACHE_DIR/huggingface"
  SFT_OPTS=()
  if [[ -z "$container" ]]; then
    # A shell that never activated the venv `make venv` built next to these scripts still finds its sft,
    # torchrun and jupyter (without this, jupyter.sbatch died with "jupyter: command not found").
    if ! command -v sft >/dev/null && [[ -x "$sft_venv_bin/sft" ]]; then
      export PATH="$sft_venv_bin:$PATH"
    fi
    export HF_HOME="${HF_HOME:-$SFT_CACHE_DIR/huggingface}"
    SFT_OVERRIDES=("output.dir=$SFT_OUTPUT_DIR")
    if [[ -f "$SFT_ENV_FILE" ]]; then SFT_OPTS+=(--env-file "$SFT_ENV_FILE"); fi
    SFT_RUN=(sft)
    SFT_EXEC=()
    return
  fi
  if [[ ! -f "$SFT_IMAGE" ]]; then
    echo "sft: error: image $SFT_IMAGE not found; build it (make build, see docs/container.md)" \
         "or set SFT_IMAGE=/path/to/sft.sif" >&2
    exit 2
  fi
  local binds=(--bind "$SFT_OUTPUT_DIR:/outputs" --bind "$SFT_CACHE_DIR:/cache")
  SFT_OVERRIDES=("output.dir=/outputs")
  if [[ -d "$SFT_DATA_DIR" ]]; then
    binds+=(--bind "$SFT_DATA_DIR:/data:ro" --bind "$SFT_DATA_DIR:$SFT_DATA_DIR:ro")
  fi
  if [[ -f "$SFT_ENV_FILE" ]]; then
    binds+=(--bind "$SFT_ENV_FILE:/secrets/.env:ro")
    SFT_OPTS+=(--env-file /secrets/.env)
  fi
  if [[ -n "${SFT_BINDS:-}" ]]; then binds+=(--bind "$SFT_BINDS"); fi
  # --nv: the host's NVIDIA driver libraries and GPUs (a harmless warning on CPU nodes).
  SFT_RUN=("$container" run --nv "${binds[@]}" "$SFT_IMAGE")
  SFT_EXEC=("$container" exec --nv "${binds[@]}" "$SFT_IMAGE")
}

# sft_remember_submission SCRIPT CONFIG [key.sub=value ...]: export SFT_SBATCH_COMMAND, the sbatch line that
# submits this job again, paths relative to the submit directory where they lie inside it. sft prints it, with the
# run's name pinned, after a plain scancel (which is not requeued). sbatch options such as --time are not known
# here: give them again.
sft_remember_submission() {
  local script
  script="$(realpath --relative-base="$sft_submit_dir" "$(dirname "${BASH_SOURCE[0]}")/$1")"
  shift
  SFT_SBATCH_COMMAND="$(printf '%q ' sbatch "$script" "$(realpath --relative-base="$sft_submit_dir" "$1")" "${@:2}")"
  export SFT_SBATCH_COMMAND="${SFT_SBATCH_COMMAND% }"
}

# sft_print_provenance: where and with what this job runs, first thing in the log.
sft_print_provenance() {
  echo "== $(date '+%F %T') job ${SLURM_JOB_ID:-none} (${SLURM_JOB_NAME:-no name}, restart ${SLURM_RESTART_COUNT:-0})" \
       "on $(hostname), nodes ${SLURM_JOB_NODELIST:-$(hostname)}"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
  else
    echo "GPUs: no nvidia-smi (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})"
  fi
  if [[ ${#SFT_EXEC[@]} -gt 0 ]]; then
    echo "runtime: $("${SFT_EXEC[0]}" --version); image $(realpath "$SFT_IMAGE")," \
         "$(du -h "$SFT_IMAGE" | cut -f1), modified $(date -r "$SFT_IMAGE" '+%F %T')"
  else
    echo "runtime: none (SFT_RUNTIME=none), sft = $(command -v sft || echo 'not on PATH')"
  fi
  # Versions, GPUs as torch sees them, and the image's build record (lock file hash, git commit, date).
  "${SFT_RUN[@]}" info || echo "warning: sft info failed (exit $?)"
}

# sft_print_total_time [STATUS]: installed as the EXIT trap, so it is the last line even when the job fails;
# also called before a requeue, which ends this shell with a signal (no EXIT trap then).
sft_print_total_time() {
  # shellcheck disable=SC2320  # $? here is the status the shell exits with (or the caller's last command)
  local status=$? elapsed=$((SECONDS - sft_started))
  status="${1:-$status}"
  printf '== %s total time %dh%02dm%02ds, exit %d\n' "$(date '+%F %T')" \
         $((elapsed / 3600)) $((elapsed % 3600 / 60)) $((elapsed % 60)) "$status"
}

# sft_supervise CMD...: run CMD in the background and wait for it, forwarding SIGUSR1/SIGTERM to it; sets
# SFT_STATUS to its exit status, SFT_SIGNAL to the last signal received and SFT_GOT_USR1=1 after a USR1.
# Why: with `--signal=B:USR1@300` (and `scancel --batch`) only this shell gets the signal, and bash runs a
# trap only between foreground commands. So the command runs in the background while `wait`, which a trapped
# signal does interrupt, and the trap passes the signal on.
# SFT_FORWARD_TERM_AS: what CMD gets when this shell gets SIGTERM (default TERM). train_multi.sbatch sets USR1:
# srun turns a SIGTERM into SIGKILL for its whole step ("forcing job termination"), and sft checkpoints on
# USR1 just as on TERM. The requeue decision below still follows what this shell received.
SFT_SIGNAL=""
SFT_GOT_USR1=0
SFT_ON_SIGNAL="${SFT_ON_SIGNAL:-sft checkpoints at the end of the current step, then stops}"
sft_supervise() {
  SFT_CHILD=""
  trap 'sft_forward USR1' USR1
  trap 'sft_forward TERM' TERM
  "$@" &
  SFT_CHILD=$!
  if [[ -n "$SFT_SIGNAL" ]]; then  # it arrived before the launch
    sft_pass_on "$SFT_SIGNAL"
  fi
  SFT_STATUS=0
  wait "$SFT_CHILD" || SFT_STATUS=$?
  while kill -0 "$SFT_CHILD" 2>/dev/null; do  # `wait` returned early because a signal ran the trap
    SFT_STATUS=0
    wait "$SFT_CHILD" || SFT_STATUS=$?
  done
  if (( SFT_STATUS > 128 )); then  # the signal came just as the child ended: fetch its real status
    local again=0
    wait "$SFT_CHILD" 2>/dev/null || again=$?
    if (( again != 127 )); then
      SFT_STATUS=$again
    fi
  fi
  trap - USR1 TERM
  return 0
}

sft_forward() {
  SFT_SIGNAL="$1"
  if [[ "$1" == USR1 ]]; then
    SFT_GOT_USR1=1
  fi
  echo "== $(date '+%F %T') got SIG$1, passing it on: $SFT_ON_SIGNAL"
  if [[ -n "${SFT_CHILD:-}" ]]; then
    sft_pass_on "$1"
  fi
}

sft_pass_on() {
  local signal="$1"
  if [[ "$signal" == TERM ]]; then
    signal="${SFT_FORWARD_TERM_AS:-TERM}"
  fi
  kill -s "$signal" "$SFT_CHILD" 2>/dev/null || true
}

# sft_requeue_if_preempted: after USR1 (Slurm's warning before the time limit, --signal=B:USR1@300, or a
# `scancel --signal=USR1 --batch`), requeue the job so that it resumes from the checkpoint sft wrote. sft
# exits 75 then; under torchrun the launcher reports a failed worker instead, so any failure after USR1
# counts. The requeued job keeps its id, reruns this script with SLURM_RESTART_COUNT+1, appends to the same
# log and resumes from the newest complete checkpoint.
# SIGTERM alone never requeues: it is what a plain `scancel` sends (the job must then stay cancelled), and
# Slurm requeues a job preempted with PreemptMode=REQUEUE by itself. sft checkpoints on it all the same.
sft_requeue_if_preempted() {
  if (( SFT_STATUS == 0 )); then
    return 0
  fi
  if (( ! SFT_GOT_USR1 )); then
    if (( SFT_STATUS == 75 )); then
      echo "== stopped by SIG${SFT_SIGNAL:-TERM} after a complete checkpoint; not requeueing (scancel or" \
           "preemption: Slurm requeues preempted jobs itself). To resume, submit the sbatch line sft printed" \
           "(with the same sbatch options)."
    fi
    return 0
  fi
  if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "== preempted; not under Slurm, so rerun the same command to resume"
    return 0
  fi
  echo "== $(date '+%F %T') preempted (exit $SFT_STATUS after SIGUSR1): requeueing job $SLURM_JOB_ID"
  # The requeue ends this shell with a signal, which skips the EXIT trap: print the total time now.
  sft_print_total_time "$SFT_STATUS"
  trap - EXIT
  scontrol requeue "$SLURM_JOB_ID" || echo "warning: scontrol requeue failed; submit the same command again to resume"
}
