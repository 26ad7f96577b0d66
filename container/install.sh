#!/usr/bin/env bash
# The build steps of both images: apptainer.def's %post and the Containerfile's RUNs call exactly this.
#   bash /opt/sft/src/container/install.sh deps   Python, venv, requirements.lock + container/jupyter.lock
#   bash /opt/sft/src/container/install.sh app    the sft package, provenance record, mount points, permissions
# Run inside the image being built, as root, with the sources in /opt/sft/src. Two phases so that the OCI build
# caches the multi-GB dependency layer while sft itself changes.
# Settings (environment, all optional):
#   SFT_GIT_COMMIT, SFT_BASE_IMAGE, SFT_BUILDER   recorded in /opt/sft/provenance.json
#   SFT_BUILD_DATE                                recorded as given (the Containerfile's labels use the same value)
#   SFT_VERSION, SFT_LOCK_SHA256                  when given, must match what is installed (labels cannot lie)
#   SFT_PIP_ARGS                                  extra pip options, e.g. "--extra-index-url URL --find-links DIR"
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
  # Python 3.11 + venv from the base's packages (Debian 12's python3 is 3.11, the version the lock was made on).
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates
    apt-get clean
    rm -rf /var/lib/apt/lists/*
  fi
  python3 -m venv "$VENV"
  # One pip call for both locks: pip refuses the build if they ever disagree.
  "$VENV/bin/pip" install "${pip_args[@]}" -r "$SRC/requirements.lock" -r "$SRC/container/jupyter.lock"
  # The image runs as the calling user: fix only what is not world-readable (a blanket chmod -R would copy
  # every file into a new layer and double the OCI image).
  find "$VENV" \( ! -perm -o+r -o -type d ! -perm -o+x \) -exec chmod a+rX,go-w {} +
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
