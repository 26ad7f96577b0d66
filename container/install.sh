#!/usr/bin/env bash
# The build steps of both images: apptainer.def's %post and the Containerfile's RUNs call exactly this.
#   bash /opt/sft/src/container/install.sh deps   system packages, venv, requirements.lock + container/*.lock
#   bash /opt/sft/src/container/install.sh app    the sft package, provenance record, mount points, permissions
# Run inside the image being built, as root, with the sources in /opt/sft/src. Two phases so that the OCI build
# caches the multi-GB dependency layer while sft itself changes.
# Settings (environment, all optional):
#   SFT_GIT_COMMIT, SFT_BASE_IMAGE, SFT_BUILDER   recorded in /opt/sft/provenance.json
#   SFT_BUILD_DATE                                recorded as given (the Containerfile's labels use the same value)
#   SFT_VERSION, SFT_LOCK_SHA256                  when given, must match what is installed (labels cannot lie)
#   SFT_PIP_ARGS                                  extra pip options, e.g. "--extra-index-url URL --find-links DIR"
#   SFT_TORCH_VARIANT   cuda (default): PyPI's torch build + container/cuda.lock, for GPU clusters
#                       cpu: the same torch version's +cpu build (2 GB smaller; from an index or wheel folder that
#                       serves it, e.g. SFT_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu")
# Build mounts, never copied into the image:
#   /opt/sft-build/ca.pem       CA bundle for pip (TLS-intercepting proxies)
#   /opt/sft-build/wheelhouse/  wheels for an offline build: pip then runs with --no-index
set -euo pipefail

phase="${1:-}"
SRC=/opt/sft/src
VENV=/opt/sft/venv
BUILD=/opt/sft-build

pip_args=(--no-cache-dir --disable-pip-version-check)
if [ -s "$BUILD/ca.pem" ]; then
  pip_args+=(--cert "$BUILD/ca.pem")
fi
if [ -n "$(ls -A "$BUILD/wheelhouse" 2>/dev/null)" ]; then
  pip_args+=(--no-index --find-links "$BUILD/wheelhouse")
fi
# Word splitting is the point: SFT_PIP_ARGS is a list of pip options.
# shellcheck disable=SC2206
pip_args+=(${SFT_PIP_ARGS:-})

install_deps() {
  install_system_packages
  python3 -m venv "$VENV"
  local locks=(-r "$SRC/requirements.lock" -r "$SRC/container/jupyter.lock")
  case "${SFT_TORCH_VARIANT:-cuda}" in
    cuda) locks+=(-r "$SRC/container/cuda.lock") ;;
    # A constraint, not a second requirement: it picks the +cpu build of exactly the locked version.
    cpu) sed -n 's/^torch==\([^+]*\)$/torch==\1+cpu/p' "$SRC/requirements.lock" > /tmp/torch-cpu.txt
         locks+=(-c /tmp/torch-cpu.txt) ;;
    *) echo "install.sh: SFT_TORCH_VARIANT=$SFT_TORCH_VARIANT; use cuda or cpu" >&2; exit 2 ;;
  esac
  # One pip call for all locks: pip refuses the build if they ever disagree.
  "$VENV/bin/pip" install "${pip_args[@]}" "${locks[@]}"
  rm -f /tmp/torch-cpu.txt
  # Wheel folders can serve either build under the same version: check we got the one asked for.
  "$VENV/bin/python" - "${SFT_TORCH_VARIANT:-cuda}" <<'PY'
import sys, torch
variant = "cuda" if torch.version.cuda else "cpu"
if variant != sys.argv[1]:
    sys.exit(f"install.sh: asked for TORCH_VARIANT={sys.argv[1]} but pip installed torch {torch.__version__} "
             f"({variant}); check SFT_PIP_ARGS / WHEELHOUSE: plain PyPI serves the CUDA build")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
  # The image runs as the calling user: fix only what is not world-readable (a blanket chmod -R would copy
  # every file into a new layer and double the OCI image).
  find "$VENV" \( ! -perm -o+r -o -type d ! -perm -o+x \) -exec chmod a+rX,go-w {} +
}

install_system_packages() {
  # python3 + venv: Debian 12's python3 is 3.11, the version the locks were made on.
  # gcc, python3-dev: Triton compiles a small C launcher per kernel signature at run time (flex_attention,
  #   torch.compile on GPUs) and includes Python.h; g++: torch.compile's CPU backend compiles C++.
  # libibverbs1, ibverbs-providers: the InfiniBand/RoCE userspace NCCL loads for multi-node traffic (without it
  #   NCCL silently falls back to TCP sockets); the kernel driver comes from the host.
  local packages=(python3 python3-venv python3-dev ca-certificates gcc g++ libc6-dev libibverbs1 ibverbs-providers)
  # A base that has them all already (an offline build) needs no apt.
  local installed
  installed="$(dpkg-query --show --showformat='${db:Status-Status}\n' "${packages[@]}" 2>/dev/null \
    | grep -cx installed || true)"
  if [ "$installed" != "${#packages[@]}" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${packages[@]}"
    apt-get clean
    rm -rf /var/lib/apt/lists/*
  fi
}

install_app() {
  # --no-build-isolation: setuptools is already in the venv (jupyter.lock), so offline builds need nothing more.
  "$VENV/bin/pip" install "${pip_args[@]}" --no-deps --no-build-isolation "$SRC"
  "$VENV/bin/pip" check
  # Build leftovers, and bytecode a host may have left in the copied sources (Apptainer's %files copies all).
  rm -rf "$SRC/build" "$SRC"/*.egg-info
  find "$SRC" -name __pycache__ -prune -exec rm -rf {} +
  write_provenance
  # Mount points of the bind contract (Apptainer binds only onto paths that exist in a read-only image).
  mkdir -p /data /outputs /cache /secrets
  chmod 0755 /data /outputs /cache /secrets
  # The image runs as the calling user: our files readable by anyone, writable by no one.
  chmod -R a+rX,go-w /opt/sft/src /opt/sft/entrypoint.py /opt/sft/configs /opt/sft/data /opt/sft/provenance.json
}

write_provenance() {
  # The build record: `sft info` prints it and every run's manifest.json copies it.
  "$VENV/bin/python" - <<'PY'
import datetime, hashlib, json, os, platform, sys
from importlib import metadata

lock = "/opt/sft/src/requirements.lock"
record = {
    "version": metadata.version("sft"),
    "git_commit": os.environ.get("SFT_GIT_COMMIT") or "unknown",
    "lock_sha256": hashlib.sha256(open(lock, "rb").read()).hexdigest(),
    "build_date": os.environ.get("SFT_BUILD_DATE")
    or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "base_image": os.environ.get("SFT_BASE_IMAGE") or "unknown",
    "builder": os.environ.get("SFT_BUILDER") or "unknown",
    "python": platform.python_version(),
    "torch": metadata.version("torch"),
}
for key, expected in (("version", "SFT_VERSION"), ("lock_sha256", "SFT_LOCK_SHA256")):
    if os.environ.get(expected) and os.environ[expected] != record[key]:
        sys.exit(f"install.sh: {expected}={os.environ[expected]} but the image has {key}={record[key]}; "
                 "build through `make build` / `make oci`, which compute both")
with open("/opt/sft/provenance.json", "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
    f.write("\n")
# Apptainer labels can be written during %post (the Containerfile sets the same keys from build arguments).
labels = os.environ.get("APPTAINER_LABELS") or os.environ.get("SINGULARITY_LABELS")
if labels:
    keys = {"org.opencontainers.image.version": "version", "org.opencontainers.image.revision": "git_commit",
            "org.opencontainers.image.created": "build_date", "org.opencontainers.image.base.name": "base_image",
            "sft.lock-sha256": "lock_sha256"}
    with open(labels, "a") as f:
        for label, key in keys.items():
            f.write(f"{label} {record[key]}\n")
print(json.dumps(record, indent=2, sort_keys=True))
PY
}

case "$phase" in
  deps) install_deps ;;
  app) install_app ;;
  *) echo "usage: install.sh deps|app" >&2; exit 2 ;;
esac
