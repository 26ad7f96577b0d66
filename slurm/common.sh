# shellcheck shell=bash disable=SC2034  # the scripts that source this file use the arrays it sets
# Shared by the sbatch scripts in slurm/ (sourced, not run): runtime choice, bind mounts, provenance,
# signal forwarding and requeue. Settings, all environment variables with defaults:
#   SFT_RUNTIME     auto | apptainer | singularity | podman | podman-hpc | none   auto: apptainer, else singularity
#                   (never podman: ask for it). none: no container, run the `sft` and `torchrun` found on PATH (a
#                   venv; what the tests use), else those of the .venv next to slurm/ (`make venv`).
#                   podman: the OCI image (make oci) with the same binds, a read-only root, the host's network,
#                   your uid (--userns=keep-id when rootless), the GPUs Slurm allocated (CDI: nvidia.com/gpu=all;
#                   podman-hpc: --gpu); train.sbatch and sweep.sbatch only (docs/slurm.md says why).
#   SFT_IMAGE       container image: a .sif file, or for podman an image in the node's image store
#                   (default: sft.sif; podman: localhost/sft:latest, as make oci tags it)
#   SFT_DATA_DIR    project data, read-only at /data and at its own path            (default: ./data, if present)
#   SFT_ENV_FILE    .env (DATA_PATH, tokens), read-only at /secrets/.env, --env-file (default: ./.env, if present)
#   SFT_OUTPUT_DIR  where run directories go, read-write at /outputs, output.dir=   (default: ./runs)
#   SFT_CACHE_DIR   caches, read-write at /cache; HF_HOME is its huggingface/       (default: ./.cache)
#   SFT_BINDS       more binds, comma-separated, apptainer syntax (src[:dst[:ro]]), e.g. a config outside ./
#                   (podman too: a bind without dst is at its own path)
#   SFT_SIGNAL_LEAD seconds of the USR1 warning (default: the script's own #SBATCH --signal=B:USR1@N line); set it
#                   when you pass another --signal to sbatch, so a time limit shorter than it is recognised
# "./" is the directory sbatch was called from. The container paths are the image's bind contract
# (docs/container.md); apptainer also binds $HOME and ./ itself, which is how configs/ is found; podman binds ./
# (read-only) and starts in it, and binds no $HOME.

SFT_RUNTIME="${SFT_RUNTIME:-auto}"
case "$SFT_RUNTIME" in
  podman|podman-hpc) SFT_IMAGE="${SFT_IMAGE:-localhost/sft:latest}" ;;
  *) SFT_IMAGE="${SFT_IMAGE:-sft.sif}" ;;
esac
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
# SFT_OVERRIDES (key=value overrides, which go after it); export SFT_SLURM_JOBS (sft_list_jobs).
sft_setup() {
  sft_list_jobs
  local container=""
  case "$SFT_RUNTIME" in
    auto) container="$(command -v apptainer || command -v singularity || true)"
          if [[ -z "$container" ]]; then
            echo "sft: error: neither apptainer nor singularity is on PATH; load its module" \
                 "(e.g. module load apptainer) or set SFT_RUNTIME=none to use an installed sft" >&2
            exit 2
          fi ;;
    apptainer|singularity|podman|podman-hpc) container="$(command -v "$SFT_RUNTIME")" || {
            echo "sft: error: SFT_RUNTIME=$SFT_RUNTIME but $SFT_RUNTIME is not on PATH" >&2; exit 2; } ;;
    none) ;;
    *) echo "sft: error: SFT_RUNTIME=$SFT_RUNTIME; use auto, apptainer, singularity, podman, podman-hpc or none" >&2
       exit 2 ;;
  esac
  mkdir -p "$SFT_OUTPUT_DIR" "$SFT_CACHE_DIR/huggingface"
  # Where sft says it stopped for a requeue (a checkpoint is complete): under torchrun its exit code 75 reaches
  # this shell only as the launcher's 1. In the output directory, which the container sees at /outputs.
  sft_stop_file="$SFT_OUTPUT_DIR/.sft-stop-${SLURM_JOB_ID:-$$}"
  rm -f "$sft_stop_file"
  SFT_OPTS=()
  if [[ -z "$container" ]]; then
    export SFT_STOP_FILE="$sft_stop_file"
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
  export SFT_STOP_FILE="/outputs/${sft_stop_file##*/}"
  # The bind contract (docs/container.md), src:dst[:ro] as both apptainer --bind and podman --volume write it.
  local binds=("$SFT_OUTPUT_DIR:/outputs" "$SFT_CACHE_DIR:/cache")
  SFT_OVERRIDES=("output.dir=/outputs")
  if [[ -d "$SFT_DATA_DIR" ]]; then
    binds+=("$SFT_DATA_DIR:/data:ro" "$SFT_DATA_DIR:$SFT_DATA_DIR:ro")
  fi
  if [[ -f "$SFT_ENV_FILE" ]]; then
    binds+=("$SFT_ENV_FILE:/secrets/.env:ro")
    SFT_OPTS+=(--env-file /secrets/.env)
  fi
  if [[ "$SFT_RUNTIME" == podman* ]]; then
    sft_setup_podman "$container" "${binds[@]}"
    return
  fi
  if [[ ! -f "$SFT_IMAGE" ]]; then
    echo "sft: error: image $SFT_IMAGE not found; build it (make build, see docs/container.md)" \
         "or set SFT_IMAGE=/path/to/sft.sif" >&2
    exit 2
  fi
  local bind flags=()
  for bind in "${binds[@]}"; do flags+=(--bind "$bind"); done
  if [[ -n "${SFT_BINDS:-}" ]]; then flags+=(--bind "$SFT_BINDS"); fi
  # --nv: the host's NVIDIA driver libraries and GPUs (a harmless warning on CPU nodes).
  SFT_RUN=("$container" run --nv "${flags[@]}" "$SFT_IMAGE")
  SFT_EXEC=("$container" exec --nv "${flags[@]}" "$SFT_IMAGE")
}

# sft_setup_podman PODMAN BIND...: SFT_RUN and SFT_EXEC for podman (or podman-hpc), as close to apptainer's as
# podman allows. Apptainer passes the host's environment and shares its namespaces; podman does neither unless told.
sft_setup_podman() {
  local podman="$1" bind flags
  shift
  if ! "$podman" image exists "$SFT_IMAGE"; then
    echo "sft: error: image $SFT_IMAGE is not in $SFT_RUNTIME's image store on $(hostname); build it (make oci)" \
         "or load it (podman load -i build/sft-oci.tar), or set SFT_IMAGE=NAME:TAG (docs/container.md)" >&2
    exit 2
  fi
  # --read-only: the image as apptainer runs a .sif (podman adds tmpfs /tmp and /run). --init: a small init
  # passes on the signals podman forwards (--sig-proxy, the default) and reaps data-loader workers.
  # Host network and hostname, as apptainer: ports are the node's, and run.lock's host must be the node's name
  # (the lock's flock works across containers: one kernel). --ipc=host: the node's /dev/shm (podman's own is
  # 64 MB) for data loaders and NCCL. --pull=never: compute nodes have no registry.
  flags=(run --rm --read-only --init --network=host --uts=host --ipc=host --pull=never
         --volume "$sft_submit_dir:$sft_submit_dir:ro" --workdir "$sft_submit_dir")
  for bind in "$@"; do flags+=(--volume "$bind"); done
  if [[ -n "${SFT_BINDS:-}" ]]; then
    local extra
    IFS=, read -ra extra <<< "$SFT_BINDS"
    for bind in "${extra[@]}"; do
      [[ "$bind" == *:* ]] || bind="$bind:$bind"  # apptainer's `src` alone; to podman it would name a volume
      flags+=(--volume "$bind")
    done
  fi
  # Rootless podman maps you to root in the container unless keep-id keeps your uid (files you own in runs/);
  # as root (rootful podman) you are root in both.
  if [[ "$(id -u)" != 0 ]]; then
    flags+=(--userns=keep-id)
  fi
  # The GPUs of this job: all of the node's through CDI (nvidia-ctk cdi generate), narrowed by the
  # CUDA_VISIBLE_DEVICES Slurm set, as apptainer --nv does. A CPU job (no GPU allocated) gets no device flag.
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$CUDA_VISIBLE_DEVICES" != NoDevFiles ]] || \
     (( ${SLURM_GPUS_ON_NODE:-0} > 0 )); then
    if [[ "$SFT_RUNTIME" == podman-hpc ]]; then flags+=(--gpu); else flags+=(--device nvidia.com/gpu=all); fi
  fi
  # What sft reads from the host environment (apptainer passes all of it; the image's own ENV must win here).
  flags+=(--env 'SLURM_*' --env SFT_STOP_FILE --env SFT_SLURM_JOBS --env SFT_JOB_END --env SFT_SBATCH_COMMAND
          --env OMP_NUM_THREADS --env CUDA_VISIBLE_DEVICES)
  SFT_RUN=("$podman" "${flags[@]}" "$SFT_IMAGE")
  SFT_EXEC=("$podman" "${flags[@]}" --entrypoint= "$SFT_IMAGE")
}

# sft_refuse_podman SCRIPT WHY: for the scripts that cannot run under podman; one error line, exit 2.
sft_refuse_podman() {
  if [[ "$SFT_RUNTIME" == podman* ]]; then
    echo "sft: error: $1 does not run under SFT_RUNTIME=$SFT_RUNTIME ($2); use SFT_RUNTIME=apptainer or none" >&2
    exit 2
  fi
}

# sft_list_jobs: export SFT_SLURM_JOBS, this user's jobs as squeue lists them now ("JOBID:STATE ..."), for sft
# inside the image, which has no squeue. A run directory whose owner's job is listed and not ended belongs to a
# live run, even while that job waits in the queue to be requeued (no process holds its flock) or runs on a node
# whose flock this node cannot see (Lustre localflock). Asked once, on the host, as the job starts; left unset
# when squeue is missing or fails (sft's flock alone decides then).
sft_list_jobs() {
  local jobs
  unset SFT_SLURM_JOBS  # a job submitted from inside another job inherits that job's list
  if [[ -n "${SLURM_JOB_ID:-}" ]] && command -v squeue >/dev/null && \
     jobs="$(squeue --me --noheader --format='%i:%T' 2>/dev/null)"; then
    export SFT_SLURM_JOBS="${jobs//$'\n'/ }"
  fi
}

# sft_read_job_end: export SFT_JOB_END, this job's end (seconds since the epoch, from squeue on the host: the
# container has none) for sft's wall-time guard, which checkpoints and stops for a requeue while one step and
# a save still fit, signal or not (docs/slurm.md). A time limit shorter than the USR1 lead makes Slurm send
# USR1 at the first check after the start, so every start would stop after a few steps: say so, and ignore
# that USR1 for the first 2 minutes (SFT_EARLY_USR1_UNTIL); the guard checkpoints before the limit instead.
SFT_EARLY_USR1_UNTIL=0
sft_read_job_end() {
  local answer end limit lead left
  if [[ -z "${SLURM_JOB_ID:-}" ]] || ! command -v squeue >/dev/null; then
    return 0
  fi
  answer="$(squeue -h -j "$SLURM_JOB_ID" -o '%e %l' 2>/dev/null || true)"
  end="${answer%% *}"
  limit="${answer#* }"
  # Without a time limit squeue still shows an end (a year after the start) or none at all.
  if [[ ! "$end" =~ ^[0-9]{4}- || "$limit" == UNLIMITED || "$limit" == INFINITE ]]; then
    return 0
  fi
  SFT_JOB_END="$(date -d "$end" +%s)"
  export SFT_JOB_END
  left=$((SFT_JOB_END - $(date +%s)))
  lead="${SFT_SIGNAL_LEAD:-$(sed -n 's/^#SBATCH --signal=B:USR1@\([0-9]*\).*/\1/p' "$0" | head -n 1)}"
  echo "== the job ends $end, in ${left} s (sft's wall-time guard checkpoints before then)"
  if [[ -n "$lead" ]] && (( left <= lead )); then
    echo "== warning: the time limit (${left} s left) is shorter than the USR1 lead (${lead} s, --signal=B:USR1@$lead):" \
         "Slurm sends USR1 right away; ignoring it for 2 minutes, the wall-time guard checkpoints before the limit." \
         "Ask for a longer --time, or a lead well below it (sbatch --signal=B:USR1@SECONDS; set SFT_SIGNAL_LEAD too)"
    SFT_EARLY_USR1_UNTIL=$((SECONDS + 120))
  fi
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
  sft_read_job_end
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
  else
    echo "GPUs: no nvidia-smi (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})"
  fi
  if [[ "$SFT_RUNTIME" == podman* ]]; then
    echo "runtime: $("${SFT_EXEC[0]}" --version); image $SFT_IMAGE," \
         "$("${SFT_EXEC[0]}" image inspect --format '{{.Id}}, {{.Size}} bytes, created {{.Created}}' "$SFT_IMAGE")"
  elif [[ ${#SFT_EXEC[@]} -gt 0 ]]; then
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
  if [[ "$1" == USR1 ]] && (( SECONDS < SFT_EARLY_USR1_UNTIL )); then
    echo "== $(date '+%F %T') got SIGUSR1 before the time limit's lead even began (see the warning above): ignored"
    return 0  # a bare return in a trap handler returns the interrupted `wait`'s 138, and set -e would exit on it
  fi
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

# sft_requeue_if_preempted: requeue the job when sft says it stopped for a requeue: exit 75 (EX_TEMPFAIL), or
# under torchrun, whose own status is 1 whatever its workers' was, the stop file sft writes ($SFT_STOP_FILE).
# It says so after a complete checkpoint, whether USR1 (Slurm's warning before the time limit,
# --signal=B:USR1@300, or `scancel --signal=USR1 --batch`) or its wall-time guard stopped it. The requeued job
# keeps its id, reruns this script with SLURM_RESTART_COUNT+1, appends to the same log and resumes from the
# newest complete checkpoint. Any other status is never requeued: after USR1 too (a USR1 that hit sft as it
# exited a finished run made it die with 138, and the requeue then failed on "holds a finished run").
# SIGTERM alone never requeues: it is what a plain `scancel` sends (the job must then stay cancelled), and
# Slurm requeues a job preempted with PreemptMode=REQUEUE by itself. sft checkpoints on it all the same.
sft_requeue_if_preempted() {
  local stopped_for_requeue=0
  if (( SFT_STATUS == 75 )) || [[ -f "$sft_stop_file" ]]; then
    stopped_for_requeue=1
  fi
  rm -f "$sft_stop_file"
  if (( SFT_STATUS == 0 )); then
    return 0
  fi
  if (( ! stopped_for_requeue )); then
    if (( SFT_GOT_USR1 )); then
      echo "== sft exited $SFT_STATUS after SIGUSR1 without stopping for a requeue (it had finished, or failed" \
           "before a checkpoint): not requeueing"
    fi
    return 0
  fi
  if [[ "$SFT_SIGNAL" == TERM ]] && (( ! SFT_GOT_USR1 )); then
    echo "== stopped by SIGTERM after a complete checkpoint; not requeueing (scancel or" \
         "preemption: Slurm requeues preempted jobs itself). To resume, submit the sbatch line sft printed" \
         "(with the same sbatch options)."
    return 0
  fi
  if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "== preempted; not under Slurm, so rerun the same command to resume"
    return 0
  fi
  echo "== $(date '+%F %T') stopped for a requeue (exit $SFT_STATUS${SFT_SIGNAL:+ after SIG$SFT_SIGNAL}):" \
       "requeueing job $SLURM_JOB_ID"
  # The requeue ends this shell with a signal, which skips the EXIT trap: print the total time now.
  sft_print_total_time "$SFT_STATUS"
  trap - EXIT
  scontrol requeue "$SLURM_JOB_ID" || echo "warning: scontrol requeue failed; submit the same command again to resume"
}
