"""A finished run's model and tokenizer, loaded back from its run directory for `sft predict` and `sft export`:
the run's own resolved config.yaml, the tokenizer (and chat template) saved in final/, and LoRA adapters put on
the base model without merging."""
from dataclasses import dataclass
from pathlib import Path

from sft.config import VARIABLE, Config
from sft.errors import UserError
from sft.run import manifest as manifests
from sft.run.directory import run_config


@dataclass
class TrainedRun:
    path: Path
    config: Config  # as the run resolved it (config.yaml), not as the YAML on disk reads today
    data_format: str
    label_names: list[str] | None

    @property
    def final(self) -> Path:
        return self.path / "final"


def open_trained_run(run_dir: str | Path) -> TrainedRun:
    """A run directory whose training finished, or UserError saying why it cannot be used yet."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory; pass a folder under output.dir (list them with `sft runs`)")
    try:
        manifest = manifests.read_manifest(path)
    except (OSError, ValueError) as error:
        raise UserError(f"{path / manifests.MANIFEST}: unreadable ({error}); is this an sft run directory?") from None
    if manifest is None:
        raise UserError(f"{path}: not an sft run directory (no {manifests.MANIFEST}); pass a folder under output.dir")
    status = manifest.get("status")
    if status != "finished":
        raise UserError(f"{path}: the run is {status}, not finished, so it has no final model yet; let it finish "
                        f"(or resume it), then retry")
    if not (path / "final").is_dir():
        raise UserError(f"{path}: final/ is missing (moved or deleted?); put the trained model back in final/")
    config = run_config(path)
    for key, value in config.model.model_dump().items():  # what loads the base model must be the real value
        unset = VARIABLE.search(value) if isinstance(value, str) else None
        if unset:
            raise UserError(f"{path / 'config.yaml'}: model.{key} comes from the secret variable {unset['name']}, "
                            f"which is not set here; export it or add it to .env, then retry")
    data = manifest.get("data") or {}
    return TrainedRun(path, config, data.get("format"), data.get("label_names"))


def load_tokenizer(run: TrainedRun):
    """The tokenizer the run trained with, chat template included (saved beside the model in final/)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.final)
    if tokenizer.pad_token is None:  # as sft.model.loading.load_tokenizer set it for training
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(run: TrainedRun, dtype="auto", attention: str = "sdpa"):
    """The trained model in eval mode: final/ itself after full fine-tuning; after LoRA the base model with the
    adapter (and classifier head) from final/ on top, unmerged (peft PeftModel). Both load by the rules training
    followed (sft.model.loading.load_pretrained: safetensors unless model.allow_pickle, trust_remote_code)."""
    from sft.model.hub import resolve_model_path
    from sft.model.loading import load_pretrained

    options = {"dtype": dtype, "attn_implementation": attention}
    if run.config.method.name == "full":
        return load_pretrained(run.config, run.final, run.label_names, **options).eval()

    from peft import PeftModel

    base = load_pretrained(run.config, resolve_model_path(run.config.model.name), run.label_names,
                           head_in_adapter=True, **options)
    return PeftModel.from_pretrained(base, run.final).eval()
