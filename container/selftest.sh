#!/usr/bin/env bash
# Proves a built image works: imports, JupyterLab, run-time compilers and caches (torch.compile, Triton), the
# InfiniBand userspace NCCL loads, `sft info` with provenance, a 2-step CPU fine-tune of the demo; on a GPU also a
# compiled flex_attention against eager attention.
#   apptainer test sft.sif                       (apptainer.def's %test runs this; also at the end of `make build`)
#   podman run --rm --entrypoint bash sft /opt/sft/src/container/selftest.sh
# Writes only under a fresh temporary directory, which it removes.
set -euo pipefail

work="$(mktemp -d "${TMPDIR:-/tmp}/sft-selftest.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# No /cache is bound during a build's %test; keep the caches in the scratch directory.
export HF_HOME="$work/hf" TRITON_CACHE_DIR="$work/triton" TORCHINDUCTOR_CACHE_DIR="$work/torchinductor"
sft=(/opt/sft/venv/bin/python /opt/sft/entrypoint.py)

echo "== imports"
# sft.logs first, as in a run: it quiets bitsandbytes' CPU-kernel advice, which peft's import of it would print.
/opt/sft/venv/bin/python -c 'import sft.logs, accelerate, datasets, jupyterlab, peft, torch, transformers'

echo "== jupyter lab (for slurm/jupyter.sbatch)"
/opt/sft/venv/bin/jupyter lab --version

echo "== torch.compile: C++ compiler, Python headers, a writable cache"
/opt/sft/venv/bin/python - <<'PY'
import os, pathlib, torch
double_sin = torch.compile(lambda x: torch.sin(x) * 2 + 1)
x = torch.randn(64)
assert torch.allclose(double_sin(x), torch.sin(x) * 2 + 1)
built = list(pathlib.Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).rglob("*.so"))
assert built, "torch.compile built nothing into TORCHINDUCTOR_CACHE_DIR"
print(f"torch.compile: CPU kernel built and cached ({built[0].name})")
PY

if [ -d /opt/sft/venv/lib/python3.11/site-packages/triton ]; then
  echo "== Triton: builds its C launcher the way it does on a GPU's first kernel (gcc + Python.h), into its cache"
  /opt/sft/venv/bin/python - <<'PY'
import os, pathlib
from triton.runtime.build import compile_module_from_src
source = """#include <Python.h>
static struct PyModuleDef probe = {PyModuleDef_HEAD_INIT, "sft_probe", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_sft_probe(void) { return PyModule_Create(&probe); }
"""
assert compile_module_from_src(source, "sft_probe").__name__ == "sft_probe"
assert list(pathlib.Path(os.environ["TRITON_CACHE_DIR"]).rglob("sft_probe*.so")), "nothing in TRITON_CACHE_DIR"
print("triton: C module compiled, cached and loaded")
PY
fi

if [ -d /opt/sft/venv/lib/python3.11/site-packages/bitsandbytes ]; then
  echo "== bitsandbytes (method.name: qlora): the wheel carries the kernels for torch's CUDA version"
  /opt/sft/venv/bin/python - <<'PY'
import pathlib, sft.logs, bitsandbytes, torch
cuda = torch.version.cuda.replace(".", "")
kernels = pathlib.Path(bitsandbytes.__file__).parent / f"libbitsandbytes_cuda{cuda}.so"
assert kernels.is_file(), f"bitsandbytes {bitsandbytes.__version__} has no kernels for CUDA {torch.version.cuda}"
print(f"bitsandbytes {bitsandbytes.__version__}: {kernels.name}")
PY
fi

echo "== InfiniBand userspace (NCCL loads libibverbs.so.1 for multi-node traffic)"
/opt/sft/venv/bin/python - <<'PY'
import ctypes, glob, torch
ctypes.CDLL("libibverbs.so.1")
providers = glob.glob("/usr/lib/*/libibverbs/libmlx5-rdmav*.so")
assert providers, "no ibverbs providers (ibverbs-providers)"
nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.version.cuda else "none (CPU torch)"
print(f"libibverbs.so.1 loads; providers include {providers[0].rsplit('/', 1)[1]}; torch's NCCL: {nccl}")
PY

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

if /opt/sft/venv/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "== GPU: compiled flex_attention (Triton) against eager attention"
  /opt/sft/venv/bin/python - <<'PY'
import torch
from torch.nn.attention.flex_attention import flex_attention
q, k, v = (torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
reference = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / 8, dim=-1) @ v.float()
error = (torch.compile(flex_attention)(q, k, v).float() - reference).abs().max().item()
assert error < 2e-2, f"flex_attention on {torch.cuda.get_device_name()} is off by {error}"
print(f"flex_attention compiled on {torch.cuda.get_device_name()}: max abs error {error:.1e} vs fp32 eager")
PY
fi
