"""Hub downloads (`sft fetch`): the files it takes, and one clear line when the hub cannot be reached.
No hub here: a real download is not tested (docs/ say so); the file choice goes through huggingface_hub's own
filter, the one snapshot_download applies."""
import os
import subprocess
import sys

from conftest import REPO, put_in_hub_cache

from sft.errors import EXIT_USER_ERROR

# A model repository as the hub lists it: weights in several formats, sharded safetensors, tokenizer files.
REPO_FILES = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
              "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin",
              "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "training_args.bin",
              "optimizer.pt", "consolidated.pth", "model.ckpt", "tf_model.h5", "flax_model.msgpack",
              "onnx/model.onnx", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "spiece.model", "vocab.txt", "merges.txt", "vocab.json",
              "chat_template.jinja", "modeling_custom.py", "README.md", ".gitattributes", "original/params.json"]


def test_fetch_takes_safetensors_config_and_tokenizer_files_and_never_a_pickle():
    from huggingface_hub.utils import filter_repo_objects

    from sft.model.hub import FETCH_PATTERNS

    fetched = set(filter_repo_objects(REPO_FILES, allow_patterns=FETCH_PATTERNS))
    assert fetched == {"config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                       "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                       "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
                       "special_tokens_map.json", "tokenizer.model", "spiece.model", "vocab.txt", "merges.txt",
                       "vocab.json", "chat_template.jinja", "original/params.json"}


def test_fetch_without_a_reachable_hub_says_so_in_one_line(tmp_path):
    """Even where the environment says offline (as the container does): fetch is the command that goes online."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, str(REPO / "entrypoint.py"), "fetch", "org/model", "--revision", "v2"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == EXIT_USER_ERROR and result.stdout == ""
    assert result.stderr == ("sft: error: sft fetch org/model: cannot reach the hub at http://127.0.0.1:9; run it on "
                             "a login node with internet access (compute nodes usually have none), or set "
                             "HTTPS_PROXY\n")
    assert not list(tmp_path.rglob("*.safetensors"))

    result = subprocess.run([sys.executable, str(REPO / "entrypoint.py"), "fetch", "./models/mine"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.startswith("sft: error: sft fetch ./models/mine: not a hub id")
    assert result.stderr.count("\n") == 1


def test_fetch_sends_the_hf_token_from_dot_env(tmp_path):
    """The token goes where a gated model needs it: in the Authorization header of every hub request."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen = []

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HOME": str(tmp_path / "hf")}
    try:
        (tmp_path / ".env").write_text("HF_TOKEN=hf_fromdotenv_1234\n")
        result = subprocess.run([sys.executable, str(REPO / "entrypoint.py"), "fetch", "org/gated"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == EXIT_USER_ERROR and result.stderr.count("\n") == 1, result.stderr
        assert "Bearer hf_fromdotenv_1234" in seen
        assert "hf_fromdotenv_1234" not in result.stderr

        seen.clear()  # --env-file, as for train
        (tmp_path / "secrets.env").write_text("HF_TOKEN=hf_fromenvfile_5678\n")
        (tmp_path / ".env").unlink()
        subprocess.run([sys.executable, str(REPO / "entrypoint.py"), "fetch", "org/gated", "--env-file",
                        str(tmp_path / "secrets.env")], cwd=tmp_path, capture_output=True, timeout=120, env=env)
        assert "Bearer hf_fromenvfile_5678" in seen
    finally:
        server.shutdown()


def test_without_hf_home_the_project_cache_is_the_cache(tiny_causal_lm, tiny_chat_data, tmp_path):
    """docs/cluster.md: models fetched into the project's .cache/huggingface (the cache slurm/'s jobs bind) are found
    by `sft check` run from the project directory with no HF_HOME set; elsewhere the error names where it looked."""
    import yaml
    from conftest import tiny_lm_config

    put_in_hub_cache(tiny_causal_lm, tmp_path / ".cache" / "huggingface" / "hub")
    config = tiny_lm_config(tiny_causal_lm, tiny_chat_data, tmp_path / "runs")
    config["model"]["name"] = "org/tiny"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HOME", "HF_HUB_CACHE")}
    env["HOME"] = str(tmp_path / "home")

    def check(cwd):
        return subprocess.run([sys.executable, str(REPO / "entrypoint.py"), "check", str(tmp_path / "c.yaml")],
                              capture_output=True, text=True, timeout=300, env=env, cwd=cwd)

    found = check(tmp_path)
    assert found.returncode == 0, found.stderr
    (tmp_path / "elsewhere").mkdir()
    missing = check(tmp_path / "elsewhere")
    assert missing.returncode == EXIT_USER_ERROR
    assert f"not in the offline hub cache ({tmp_path / 'home' / '.cache' / 'huggingface' / 'hub'})" in missing.stderr
