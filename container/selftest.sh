#!/usr/bin/env bash
# Proves a built image works: imports, JupyterLab, `sft info` with provenance, a 2-step CPU fine-tune of the demo.
#   apptainer test sft.sif                       (apptainer.def's %test runs this; also at the end of `make build`)
#   podman run --rm --entrypoint bash sft /opt/sft/src/container/selftest.sh
# Writes only under a fresh temporary directory, which it removes.
set -euo pipefail

work="$(mktemp -d "${TMPDIR:-/tmp}/sft-selftest.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# No /cache is bound during a build's %test; keep the datasets cache in the scratch directory.
export HF_HOME="$work/hf"
sft=(/opt/sft/venv/bin/python /opt/sft/entrypoint.py)

echo "== imports"
/opt/sft/venv/bin/python -c 'import accelerate, datasets, jupyterlab, peft, sft, torch, transformers'

echo "== jupyter lab (for slurm/jupyter.sbatch)"
/opt/sft/venv/bin/jupyter lab --version

echo "== sft info"
COLUMNS=200 "${sft[@]}" info | tee "$work/info.txt"
grep -q "image git_commit" "$work/info.txt" || { echo "selftest: sft info shows no image provenance" >&2; exit 1; }

echo "== 2-step CPU fine-tune of the demo"
cd /opt/sft
"${sft[@]}" train configs/demo.yaml output.dir="$work/runs" output.name=selftest training.max_steps=2
/opt/sft/venv/bin/python - "$work/runs/selftest/manifest.json" <<'PY'
import json, sys
manifest = json.load(open(sys.argv[1]))
image = json.load(open("/opt/sft/provenance.json"))
assert manifest["status"] == "finished", manifest["status"]
assert manifest["image"] == image, (manifest["image"], image)
print("selftest: run finished; its manifest.json records this image:", image["git_commit"])
PY
