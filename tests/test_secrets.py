"""Secrets: every secret-named value from the environment or .env is masked in every file of a run and on the
terminal, whatever its shape, referenced by the config or not."""
import json
import subprocess
import sys

import yaml

from conftest import REPO, tiny_lm_config
from sft.secrets import is_secret_name, mask, register_public, register_secret

SECRETS = {"HF_TOKEN": "hf_onlyinenv_1234",  # never referenced by the config
           "WANDB_KEY": "wandbkey_5678",  # *KEY* names
           "DB_PASS": 'p"a\\ss_9012',  # a quote and a backslash: JSON escaping must not hide it from masking
           "API_CREDENTIALS": "créd_ünicode_3456"}  # JSON would escape these letters too
# A short numeric secret: masking text after JSON encoding turned `20000` into `***0` and broke the manifest. Not
# grepped for (the digits occur in numbers of any run); every JSON file must still parse and the run finish.
SHORT_SECRET = {"PIN_PASS": "2000"}


def test_secret_names():
    for name in ("HF_TOKEN", "WANDB_API_KEY", "WANDB_KEY", "DB_PASS", "PGPASSWORD", "AWS_SECRET_ACCESS_KEY"):
        assert is_secret_name(name), name
    for name in ("TOKENIZERS_PARALLELISM", "HOME", "PASSAGE_DIR", "SSH_AUTH_SOCK"):
        assert not is_secret_name(name), name


def test_a_secret_is_masked_as_a_word_and_text_that_only_contains_it_stays_as_it_is():
    register_secret("quokka42")
    register_public("/data/quokka42-X0l2/llama")  # a config value the user wrote (sft.config registers them)
    line = "password quokka42; quokka42s xquokka42 /data/quokka42-X0l2/llama/config.json 'quokka42' a/quokka42/b"
    assert mask(line) == "password ***; quokka42s xquokka42 /data/quokka42-X0l2/llama/config.json '***' a/***/b"
    register_public("quokka42")  # a value equal to the secret is no reason to show it
    assert mask("token quokka42") == "token ***"


def test_planted_secrets_reach_no_file_of_the_run_and_no_terminal_line(tiny_causal_lm, tiny_chat_data, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{name}='{value}'\n" for name, value in {**SECRETS, **SHORT_SECRET}.items())
                        .replace("\\", "\\\\"))
    # Referenced ones land in config.yaml, and the data file's name in the manifest (as JSON-escaped text).
    data = tmp_path / f"chat-{SECRETS['DB_PASS']}.jsonl"
    data.write_bytes(tiny_chat_data.read_bytes())
    config = tiny_lm_config(tiny_causal_lm, tmp_path / "chat-${DB_PASS}.jsonl", tmp_path / "runs", max_steps=2,
                            save_steps=1)
    config["model"]["revision"] = "${WANDB_KEY}"
    config["env_file"] = str(env_file)
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [sys.executable, str(REPO / "entrypoint.py"), "train", str(config_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # A config error that echoes the value (`got '...'`) is masked too.
    config["training"]["epochs"] = "${HF_TOKEN}"
    config_path.write_text(yaml.safe_dump(config))
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert refused.returncode == 2 and "training.epochs" in refused.stderr

    run_files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    for path in run_files:  # every JSON document still parses (json.loads raises otherwise)
        if path.suffix in (".json", ".jsonl"):
            for document in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
                json.loads(document)
    assert json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())["status"] == "finished"
    assert any(p.name == "manifest.json" for p in run_files) and any(p.name == "config.yaml" for p in run_files)
    outputs = {"terminal": result.stdout + result.stderr + refused.stdout + refused.stderr,
               **{str(p): p.read_bytes().decode("utf-8", "replace") for p in run_files}}
    for value in SECRETS.values():
        leaks = [where for where, text in outputs.items()
                 if value in text or value.encode("unicode_escape").decode() in text
                 or value.replace("\\", "\\\\").replace('"', '\\"') in text]
        assert not leaks, (value, leaks)
    # config.yaml records where a secret variable was used, never its value.
    assert "revision: ${WANDB_KEY}" in (tmp_path / "runs" / "tiny" / "config.yaml").read_text()
