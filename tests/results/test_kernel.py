"""sft kernel install: the venv kernel really starts under jupyter_client and imports sft; the image kernel's
command line is `apptainer exec --nv` with exactly the binds slurm/common.sh gives the sbatch scripts."""
import json
import os
import subprocess
import sys

from conftest import REPO

from sft.cli import main


def test_the_venv_kernel_starts_and_imports_sft(tmp_path, monkeypatch, capsys):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import start_new_kernel

    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))  # never the user's real kernels
    assert main(["kernel", "install", "--name", "sft-test"]) == 0
    spec = KernelSpecManager().get_kernel_spec("sft-test")
    assert spec.argv[0] == sys.executable
    manager, client = start_new_kernel(kernel_name="sft-test", cwd=str(tmp_path), startup_timeout=120)
    try:
        outputs = []
        reply = client.execute_interactive("import sft, sys; print(sft.__file__, sys.executable)", timeout=120,
                                           output_hook=lambda message: outputs.append(message["content"]))
        assert reply["content"]["status"] == "ok"
        printed = "".join(content.get("text", "") for content in outputs).split()
        assert printed == [str(REPO / "sft" / "__init__.py"), sys.executable]
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_a_prefix_installs_there(tmp_path, capsys):
    assert main(["kernel", "install", "--prefix", str(tmp_path / "env"), "--display-name", "Fine-tuning"]) == 0
    spec = json.loads((tmp_path / "env" / "share" / "jupyter" / "kernels" / "sft" / "kernel.json").read_text())
    assert spec["display_name"] == "Fine-tuning" and spec["argv"][-2:] == ["-f", "{connection_file}"]


def common_sh_exec(project, env) -> list[str]:
    """SFT_EXEC as slurm/common.sh's sft_setup builds it for the sbatch scripts."""
    script = f'source {REPO}/slurm/common.sh; sft_setup; printf "%s\\n" "${{SFT_EXEC[@]}}"'
    result = subprocess.run(["bash", "-c", script], cwd=project, env=env, capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def test_the_image_kernel_uses_the_sbatch_scripts_binds(tmp_path, monkeypatch, capsys):
    project, tools = tmp_path / "project", tmp_path / "bin"
    for folder in (project / "data", tools):
        folder.mkdir(parents=True)
    (project / ".env").write_text("DATA_PATH=/data\n")
    (project / "sft.sif").write_bytes(b"image")
    apptainer = tools / "apptainer"
    apptainer.write_text("#!/bin/sh\nexit 0\n")
    apptainer.chmod(0o755)
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "SFT_IMAGE": str(project / "sft.sif"),
           "SFT_BINDS": "/scratch/shared:/scratch/shared:ro", "JUPYTER_DATA_DIR": str(tmp_path / "jupyter")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(project)
    assert main(["kernel", "install", "--image", "sft.sif"]) == 0
    argv = json.loads((tmp_path / "jupyter" / "kernels" / "sft-image" / "kernel.json").read_text())["argv"]
    expected = common_sh_exec(project, env)
    assert expected[:3] == [str(apptainer), "exec", "--nv"] and f"{project}/data:/data:ro" in expected
    assert f"{project}/.env:/secrets/.env:ro" in expected and "/scratch/shared:/scratch/shared:ro" in expected
    assert argv == expected + ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
