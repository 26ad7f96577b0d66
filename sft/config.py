"""Config stage: YAML + .env + `key.sub=value` overrides → one validated `Config`, every problem reported at once."""
import codecs
import datetime
import difflib
import io
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationError,
                      model_validator)

from sft import allocation, secrets
from sft.errors import UserError


class Section(BaseModel):
    # Unknown keys fail loudly (a typo must never silently fall back to a default). Unquoted numbers where a string
    # belongs (`name: 2024`, `revision: 1234abc` is fine, `revision: 1234` is a number to YAML) are taken as text.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), coerce_numbers_to_str=True)


def _no_from_yaml_false(value: Any) -> Any:
    """YAML 1.1 reads an unquoted `no` (or `off`) as false: for a strategy, that can only mean "no"."""
    return "no" if value is False else value


Strategy = Annotated[Literal["epoch", "steps", "no"], BeforeValidator(_no_from_yaml_false)]


class ModelConfig(Section):
    """The pretrained model to start from and how to run it."""
    name: str = Field(description="Hub id, local directory, or `pkg:MODULE` for a Python package that ships weights "
                                  "(it must provide `get_model_path()`).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    num_labels: int | None = Field(None, ge=2, description="classification: number of classes; checked against the data.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = Field(
        "auto", description="Attention kernel. auto: the fastest exact one for this device and task (docs/performance.md): "
                            "on GPUs varlen flash attention if installed, else flex_attention for packed causal_lm "
                            "batches, else sdpa without the cuDNN backend; on CPU the fastest measured by `make bench`; "
                            "sdpa for classification. The choice is logged and recorded in manifest.json.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute precision (autocast); trained weights stay fp32, LoRA's frozen base is stored in "
                            "it. auto: bf16 on GPUs that support it, else fp32. float16 needs a GPU; bfloat16 on "
                            "CPU works (slow without bf16 instructions).")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub; off because it runs arbitrary code.")
    allow_pickle: bool = Field(False, description="Allow loading model weights stored as pickle files "
                                                  "(pytorch_model.bin); off because unpickling can run code. "
                                                  "Weights are always saved as safetensors.")


class SourceFields(Section):
    """This source's column names where they differ from data.fields, e.g. {prompt: question, completion: answer}."""
    text: str | None = None
    text_pair: str | None = None
    label: str | None = None
    messages: str | None = None
    prompt: str | None = None
    completion: str | None = None
    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    tools: str | None = None


class Mixing(Section):
    """Per-source settings shared by every kind of source."""
    fields: SourceFields | None = Field(None, description="Column names of this source, mapped onto data.fields.")
    max_rows: int | None = Field(None, ge=1, description="Use at most this many rows of this source (a seeded random "
                                                        "pick by training.seed).")
    fraction: float | None = Field(None, gt=0.0, le=1.0, description="Use this share of the source's rows "
                                                                    "(seeded random pick), for mixing sources.")


class FileSource(Mixing):
    path: str = Field(description="A data file, or a `datasets.save_to_disk` folder.")
    split: str | None = Field(None, description="Split of a saved DatasetDict (e.g. validation).")


class SQLSource(Mixing):
    database: str = Field(description="Database URL: sqlite:///path/to.db or postgresql://user:${PGPASSWORD}@host/db "
                                      "(password from .env or the environment; never written anywhere).")
    query: str = Field(description="SELECT returning one row per example; column names are the field names. Runs in "
                                   "a read-only transaction; rows are streamed in chunks.")
    timeout: float = Field(600, gt=0, description="Query timeout in seconds (PostgreSQL and SQLite): a runaway query "
                                                  "fails with a message instead of holding the job.")


def _source_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "path"
    if isinstance(value, list):
        return "paths"
    if isinstance(value, dict):
        return "sql" if "database" in value or "query" in value else "file"
    if isinstance(value, (FileSource, SQLSource)):
        return "sql" if isinstance(value, SQLSource) else "file"
    return None


SOURCE_ERROR = "expected a path, a list of paths, {path, split} or {database, query}"
# One source of any kind: a path, {path, ...} or {database, query, ...}.
SourceItem = Annotated[Annotated[str, Tag("path")] | Annotated[FileSource, Tag("file")] | Annotated[SQLSource, Tag("sql")],
                       Discriminator(_source_kind, custom_error_type="source", custom_error_message=SOURCE_ERROR)]
# The shape picks the variant, so an error names what is wrong with that one instead of listing every variant.
# A list mixes sources of any kind (files, folders, SQL) into one dataset.
Source = Annotated[Annotated[str, Tag("path")] | Annotated[list[SourceItem], Tag("paths")]
                   | Annotated[FileSource, Tag("file")] | Annotated[SQLSource, Tag("sql")],
                   Discriminator(_source_kind, custom_error_type="source", custom_error_message=SOURCE_ERROR)]
SOURCE_TAGS = {"path", "paths", "file", "sql"}


class Fields(Section):
    """Column names in the user's data, per format."""
    text: str = Field("text", description="classification and text: the text.")
    text_pair: str | None = Field(None, description="classification: second text of a pair (e.g. NLI hypothesis).")
    label: str = Field("label", description="classification: the label, an int id or a class name.")
    messages: str = Field("messages", description="messages: the conversation, a list of {role, content} (OpenAI) "
                                                  "or {from, value} (ShareGPT); `conversations` is found too.")
    roles: dict[str, str] = Field(default_factory=dict, description="messages: role names of the data → system, "
                                  "user, assistant, tool or tool_call, added to the usual ones (human → user, gpt "
                                  "→ assistant, observation → tool, function_call → tool_call, ...).")
    tools: str = Field("tools", description="messages: per-row function schemas (a list or a JSON string) passed to "
                                            "the chat template; the column is optional.")
    prompt: str = Field("prompt", description="prompt_completion: the prompt (no loss on it).")
    completion: str = Field("completion", description="prompt_completion: the answer the loss is computed on.")
    instruction: str = Field("instruction", description="instruction: the task description.")
    input: str = Field("input", description="instruction: optional context for the task.")
    output: str = Field("output", description="instruction: the answer the loss is computed on.")


class DataConfig(Section):
    """Where the examples come from and how they become tokens (docs/data.md)."""
    train: Source = Field(description="Training data: file path(s), {path, split}, {database, query}, or a list "
                                      "mixing them.")
    eval: Source | None = Field(None, description="Evaluation data; when absent, eval_fraction of train is held out.")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Held-out share of train (split by training.seed); "
                                                                  "0 with no eval data disables evaluation.")
    format: Literal["auto", "classification", "messages", "prompt_completion", "instruction", "text"] = Field(
        "auto", description="auto: classification for task=classification, else guessed from the columns.")
    fields: Fields = Field(default_factory=Fields)
    label_names: list[str] | None = Field(None, description="classification: class names in id order; inferred "
                                                            "(sorted) from string labels when absent.")
    max_length: int = Field(512, ge=8, description="Tokens per example after truncation (no padding to this length).")
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="messages: which assistant turns carry loss: every one, or only the last of each "
                                     "conversation. Turns with weight 0 (OpenAI format) never do.")
    train_on_reasoning: bool = Field(True, description="messages: train on an answer's reasoning trace "
                                                       "(reasoning_content or thinking); false: the loss starts after it.")
    system_prompt: str | None = Field(None, description="A system message added to conversations that have none (and "
                                                        "to instruction rows rendered with the chat template).")
    dedupe: bool = Field(False, description="Drop exact duplicate examples (same values in the format's fields).")
    cache_dir: str | None = Field(None, description="Where tokenized data is cached; default $HF_HOME/sft "
                                                    "(~/.cache/huggingface/sft). Safe to delete.")
    num_proc: int | None = Field(None, ge=1, description="Tokenizer processes; default: SLURM_CPUS_PER_TASK, else "
                                                         "the CPUs this process may use (fewer for small data).")
    wait_minutes: float = Field(120, gt=0, description="How long other processes (torchrun ranks, a second job) wait "
                                                       "for the one preparing the same data; raise for huge data.")


class LoraSettings(Section):
    """LoRA adapter settings (peft), used when method.name is lora."""
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Scaling numerator; usually 2*r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input during training.")
    target_modules: str | list[str] = Field("all-linear", description="Module names to adapt; all-linear = every linear "
                                                                       "layer except the output head.")


class MethodConfig(Section):
    """What is trained: LoRA adapters or all weights."""
    name: Literal["lora", "full", "qlora"] = Field(
        "lora", description="lora trains adapters (+ the classifier head); full trains all weights; qlora trains LoRA "
                            "adapters over a 4-bit (NF4) base through bitsandbytes, for models that do not fit "
                            "otherwise (CUDA GPUs only; `sft check --gpu-mem` says when it is needed).")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    merge: bool = Field(False, description="lora: also save the adapter merged into the base weights in final/merged/.")


EVAL_METRICS = {"classification": ("loss", "accuracy", "macro_f1", "weighted_f1"),
                "causal_lm": ("loss", "token_accuracy")}


class EarlyStopping(Section):
    patience: int = Field(3, ge=1, description="Evaluations in a row without improvement before training stops.")
    metric: str = Field("eval_loss", description="Eval metric to watch: eval_loss (lower is better); classification "
                                                 "eval_accuracy, eval_macro_f1, eval_weighted_f1, causal_lm "
                                                 "eval_token_accuracy (higher is better). Also picks the best "
                                                 "checkpoint for load_best_model_at_end.")
    threshold: float = Field(0.0, ge=0, description="Smallest change of the metric that counts as an improvement.")


def _end_time_or_duration(value: Any) -> Any:
    """training.stop_at: YAML reads an unquoted 2026-12-07T18:00:00 as a datetime; keep it as the text it was."""
    if isinstance(value, datetime.datetime):
        value = value.isoformat()
    if isinstance(value, str):
        allocation.parse_end(value, now=0)  # ValueError: reported with the key's path
    return value


class TrainingConfig(Section):
    """The Trainer recipe: steps, batches, optimizer, evaluation, checkpoints, processes."""
    epochs: float = Field(3, gt=0, description="Passes over the training data; fractions allowed.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (overrides epochs when > 0).")
    batch_size: int = Field(8, ge=1, description="Examples per device per step.")
    eval_batch_size: int | None = Field(None, ge=1, description="Defaults to batch_size.")
    max_tokens_per_batch: Annotated[int, Field(ge=8)] | Literal["auto"] | None = Field(
        "auto", description="causal_lm: size batches by tokens instead of examples (~8k filled an H100 well). auto: "
                            "sized for the device (GPU: 8192, fewer when the memory estimate says so; CPU: data.max_length); "
                            "null: batch_size examples per batch. Classification always uses batch_size.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Batches per optimizer step (a larger effective "
                                                                  "batch in the same memory).")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the steps spent warming the rate up from 0.")
    lr_scheduler: str = Field("linear", description="Any transformers scheduler name (linear, cosine, constant, ...).")
    max_grad_norm: float = Field(1.0, description="Gradients are clipped to this total norm.")
    eval_strategy: Strategy = Field("epoch", description="When to evaluate: each epoch, every eval_steps, or no.")
    eval_steps: int | None = Field(None, ge=1, description="Setting it switches eval_strategy to steps.")
    save_strategy: Strategy = Field("epoch", description="When to checkpoint: each epoch, every save_steps, or no "
                                                         "(then only a preemption writes one, for the requeued job "
                                                         "to resume from, removed once the run finishes).")
    save_steps: int | None = Field(None, ge=1, description="Setting it switches save_strategy to steps.")
    save_total_limit: int | None = Field(2, ge=1, description="Checkpoints kept; the newest complete one is resumed from.")
    logging_steps: int = Field(10, ge=1, description="Optimizer steps between loss lines in the log and metrics.jsonl.")
    seed: int = Field(42, description="Seeds python, numpy and torch before the model is built: the same config, "
                                      "data and seed give the same run on the same hardware and image.")
    deterministic: bool = Field(False, description="GPUs: deterministic kernels (torch deterministic algorithms, "
                                                   "cuDNN deterministic, fixed cuBLAS workspace) so reruns and resumes "
                                                   "match bit for bit; costs speed (docs/slurm.md). CPU runs are "
                                                   "deterministic without it.")
    early_stopping: EarlyStopping | None = Field(None, description="Stop when the eval metric has not improved for "
                                                                   "`patience` evaluations: {patience: 3, metric: "
                                                                   "eval_loss, threshold: 0.0} (the defaults). "
                                                                   "metric: eval_loss (lower is better), or "
                                                                   "eval_accuracy, eval_macro_f1, eval_weighted_f1 "
                                                                   "(classification), eval_token_accuracy (causal_lm); "
                                                                   "threshold: the smallest change that counts.")
    load_best_model_at_end: bool = Field(False, description="Keep the best checkpoint (by early_stopping.metric, "
                                                            "else eval_loss) and save it as final/; needs "
                                                            "save_strategy equal to eval_strategy.")
    overfitting_warning: int = Field(2, ge=1, description="Warn in the log when eval loss has risen this many "
                                                          "evaluations in a row while training loss fell.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less "
                                                           "memory for about one more forward pass of compute.")
    chunked_loss: bool | Literal["auto"] = Field(
        "auto", description="causal_lm: compute the loss and its gradients from the last hidden states a chunk of "
                            "tokens at a time, so the tokens x vocabulary logits are never held whole (about half "
                            "the peak memory at a 152k vocabulary). auto: on for the architectures checked against "
                            "the model's own loss (sft/model/loss.py: llama, mistral, qwen2, qwen3, phi3, olmo2, "
                            "smollm3), off under training.fsdp.")
    compile: bool = Field(False, description="torch.compile the model (Trainer's torch_compile: Inductor; batch shapes "
                                             "become dynamic after the first recompile). Compiling takes tens of "
                                             "seconds at the start of every session, resumes included; docs/"
                                             "performance.md has what it gained where it was measured.")
    ddp_backend: Literal["nccl", "gloo"] | None = Field(None, description="Defaults to nccl on GPUs, gloo on CPU.")
    fsdp: str = Field("", description="Trainer's fsdp option, e.g. 'full_shard auto_wrap', for models beyond one GPU.")
    ddp_timeout: int = Field(1800, ge=1, description="Seconds a rank waits in a collective (a barrier, an all-reduce) "
                                                     "before the job fails; raise it if rank 0's data preparation "
                                                     "or checkpoint writes take longer.")
    stop_at: Annotated[str | None, BeforeValidator(_end_time_or_duration)] = Field(
        None, description="When this session's allocation ends, for schedulers other than Slurm (under Slurm the "
                          "job's end time is read by itself): a time (2026-12-07T18:00, local time) or a duration "
                          "from the session's start (3h30m, 90m). Before it, sft checkpoints and stops with exit code "
                          "75 while one more step and a checkpoint save still fit (docs/slurm.md). The SFT_JOB_END "
                          "environment variable does the same; the earliest end wins.")

    @model_validator(mode="after")
    def _steps_imply_strategy(self) -> "TrainingConfig":
        if self.save_steps is not None:
            self.save_strategy = "steps"
        if self.eval_steps is not None:
            self.eval_strategy = "steps"
        return self


class OutputConfig(Section):
    """Where the run directory goes."""
    dir: str = Field("runs", description="Parent of run directories; bind it read-write in the container.")
    name: str = Field("{config}-{date}", description="Run directory name; {config}, {date} and {time} are filled "
                                                    "once and recorded, so a requeued job finds the same directory.")
    samples: int = Field(3, ge=0, description="causal_lm: this many eval prompts are answered greedily before and "
                                              "after training and shown in report.md; 0 when eval data must not "
                                              "appear in a report.")


class Config(Section):
    """A whole config file."""
    task: Literal["classification", "causal_lm"] = Field(description="classification: a label per text; causal_lm: "
                                                                      "learn to generate (chat, completions, text).")
    model: ModelConfig
    data: DataConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    env_file: str | None = Field(None, description=".env file with DATA_PATH, tokens, ...; default: ./.env if present.")
    # Filled by load_config, not by the user.
    config_path: Path | None = Field(None, exclude=True)
    _secret_templates: dict[str, str] = PrivateAttr(default_factory=dict)  # resolved text → text with ${VAR} kept

    @model_validator(mode="after")
    def _settings_agree(self) -> "Config":
        budget = self.training.max_tokens_per_batch
        budget = None if budget == "auto" else budget
        if budget is not None and self.task != "causal_lm":
            raise ValueError("training.max_tokens_per_batch: only for task causal_lm; use training.batch_size")
        if self.model.attn_implementation == "flex_attention" and self.task != "causal_lm":
            # Flex is exact on packed causal batches; on a lone unmasked sequence some CPU builds gave logits off by
            # 0.14 or NaN, and padded classification batches gain nothing from it.
            raise ValueError("model.attn_implementation: flex_attention is for packed causal_lm batches; "
                             "use sdpa for classification")
        self._check_best_model_settings()
        if self.training.chunked_loss is True and (self.task != "causal_lm" or self.training.fsdp):
            raise ValueError("training.chunked_loss: true is for causal_lm runs without training.fsdp (untested with "
                             "sharded weights); use auto")
        if self.method.name == "qlora" and self.method.merge:
            raise ValueError("method.merge: not with qlora (its base weights are 4-bit); merge the saved adapter into "
                             "the original base model afterwards")
        if budget is not None and budget < self.data.max_length:
            raise ValueError(f"training.max_tokens_per_batch: {budget} is below data.max_length "
                             f"{self.data.max_length}; a long example would not fit in any batch")
        return self

    def _check_best_model_settings(self) -> None:
        t = self.training
        if t.early_stopping is None and not t.load_best_model_at_end:
            return
        what = "training.early_stopping" if t.early_stopping else "training.load_best_model_at_end"
        if t.eval_strategy == "no" or (self.data.eval is None and self.data.eval_fraction == 0):
            raise ValueError(f"{what}: needs evaluations; set data.eval or data.eval_fraction, and "
                             f"training.eval_strategy")
        if t.early_stopping:
            allowed = EVAL_METRICS[self.task]
            if t.early_stopping.metric.removeprefix("eval_") not in allowed:
                raise ValueError(f"training.early_stopping.metric: {t.early_stopping.metric} is not an eval metric of "
                                 f"{self.task}; use one of {', '.join('eval_' + name for name in allowed)}")
        if t.load_best_model_at_end:
            # Trainer can only go back to a checkpoint saved where it evaluated.
            if t.save_strategy != t.eval_strategy:
                raise ValueError(f"training.load_best_model_at_end: save_strategy ({t.save_strategy}) must equal "
                                 f"eval_strategy ({t.eval_strategy})")
            if t.save_strategy == "steps" and t.save_steps and t.eval_steps and t.save_steps % t.eval_steps:
                raise ValueError(f"training.load_best_model_at_end: save_steps ({t.save_steps}) must be a multiple "
                                 f"of eval_steps ({t.eval_steps})")


VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def load_config(path: str | Path, overrides: list[str] = (), env_file: str | None = None) -> Config:
    """Read, interpolate, override and validate a config; raise UserError listing every problem."""
    path = Path(path)
    raw = _read_yaml(path)
    for override in overrides:
        _apply_override(raw, override)
    load_env_file(env_file or raw.get("env_file"), path)
    problems: list[str] = []
    templates: dict[str, str] = {}
    raw = _interpolate(raw, "", problems, templates)
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        raise UserError(f"{path}: " + "; ".join(_describe(e) for e in error.errors())) from None
    config.config_path = path.resolve()
    config._secret_templates = templates
    _find_relative_data_paths(config)
    return config


def load_run_config(path: Path) -> Config:
    """A run's config.yaml (resolved_yaml): the ${VAR} references of secret variables are resolved again from the
    environment or .env, as at train time; one whose variable is not set now stays as written (a clean needs no
    database password). Raises ValueError (pydantic's ValidationError) for a config that does not validate."""
    raw = _read_yaml(path)
    env_file = raw.get("env_file")
    load_env_file(env_file if isinstance(env_file, str) and Path(os.path.expandvars(env_file)).is_file() else None,
                  path)
    return Config.model_validate(_interpolate(raw, "", [], {}, keep_unset=True))


def _find_relative_data_paths(config: Config) -> None:
    """A relative data path is looked up from the current directory (the rule before configs could live anywhere),
    then from the config's directory and, for a config in a `configs/` folder, the project directory above it: so
    `sft check ../project/configs/demo.yaml` finds ../project/data/... too. A path found elsewhere than the current
    directory becomes absolute; one found nowhere stays as written, for the data stage to report."""
    folder = config.config_path.parent
    beside_config = [folder] + ([folder.parent] if folder.name == "configs" else [])

    def found(path: str) -> str:
        if Path(path).is_absolute() or Path(path).exists():
            return path
        return next((str(base / path) for base in beside_config if (base / path).exists()), path)

    for key in ("train", "eval"):
        source = getattr(config.data, key)
        items = source if isinstance(source, list) else [source]
        for item in items:
            if isinstance(item, FileSource):
                item.path = found(item.path)
        if isinstance(source, str):
            setattr(config.data, key, found(source))
        elif isinstance(source, list):
            setattr(config.data, key, [found(item) if isinstance(item, str) else item for item in source])


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: config file not found; pass the path to a YAML config (see configs/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(error, 'problem', error)}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections (task, model, data, ...) at the top level")
    return raw


def _apply_override(raw: dict, override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise UserError(f"override '{override}': expected key.sub=value, e.g. training.epochs=1")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override '{override}': {part} is not a section")
        node = child
    node[leaf] = _parse_value(value)


def _parse_value(text: str) -> Any:
    """YAML scalars and lists (`1`, `3e-5`, `[a, b]`); anything YAML cannot read (`{config}-x`) stays a string."""
    if not text:
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_env_file(env_file: str | None, config_path: Path | None = None) -> None:
    """Load .env into the process environment (tokens must reach huggingface_hub too); real env vars win."""
    from dotenv import dotenv_values
    from dotenv.parser import parse_stream

    secrets.register_secrets_from(dict(os.environ))
    if env_file is not None and not isinstance(env_file, str):
        raise UserError(f"{config_path}: env_file: expected the path of a .env file, e.g. env_file: .env")
    if env_file:
        env_path = Path(os.path.expandvars(env_file))
        if not env_path.is_file():
            raise UserError(f"env_file '{env_file}': file not found; create it or drop the setting")
    else:
        env_path = Path(".env")
        if not env_path.is_file():
            return
    text = _env_text(env_path)
    broken = [binding.original.line for binding in parse_stream(io.StringIO(text)) if binding.error]
    if broken:  # dotenv would skip the line with a warning, and a variable the user set would be "not set"
        raise UserError(f"{env_path}:{broken[0]}: cannot read this line; write NAME=value, one per line, with "
                        f"quotes closed")
    values = dotenv_values(stream=io.StringIO(text))
    data_path = values.get("DATA_PATH")
    if data_path and not Path(data_path).exists() and (env_path.parent / data_path).exists():
        # Relative, as for paths in a config: from the current directory, else from beside the .env (which, bound
        # at /secrets/.env in the image, is found from the current directory there).
        values["DATA_PATH"] = os.path.normpath(env_path.parent.absolute() / data_path)
    secrets.register_secrets_from(values)
    for name, value in values.items():
        if value is not None:
            os.environ.setdefault(name, value)


def _env_text(path: Path) -> str:
    """A .env file as Windows editors save it too: a UTF-8 byte-order mark (it would become part of the first
    name) or UTF-16."""
    data = path.read_bytes()
    encoding = "utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; re-save it as UTF-8") from None


def _interpolate(node: Any, where: str, problems: list[str], templates: dict[str, str],
                 keep_unset: bool = False) -> Any:
    """Substitute ${VAR} and ${VAR:-default}. A string that took a secret variable's value is noted in TEMPLATES
    (resolved → the text with that reference kept) for config.yaml; KEEP_UNSET leaves unset variables as written."""
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{where}.{k}" if where else str(k), problems, templates, keep_unset)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{where}[{i}]", problems, templates, keep_unset) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def value_of(match: re.Match) -> str:
        name, default = match["name"], match["default"]
        value = os.environ.get(name)
        if value is None:
            if keep_unset:
                return match[0]
            if default is None:
                problems.append(f"{where}: environment variable {name} is not set; "
                                f"export it or add it to .env (or write ${{{name}:-default}})")
                return ""
            value = default
        if secrets.is_secret_name(name):
            secrets.register_secret(value)
        return value

    resolved, template, end = [], [], 0
    for match in VARIABLE.finditer(node):
        value = value_of(match)
        resolved += [node[end:match.start()], value]
        template += [node[end:match.start()], match[0] if secrets.is_secret_name(match["name"]) else value]
        end = match.end()
    resolved_text, template_text = "".join(resolved) + node[end:], "".join(template) + node[end:]
    if template_text != resolved_text:
        templates[resolved_text] = template_text
    else:
        secrets.register_public(resolved_text)
    return resolved_text


def _describe(error: dict) -> str:
    """One pydantic error → 'yaml.path: what is wrong — how to fix'."""
    loc = [str(p) for p in error["loc"]]
    # A data source's variant tag shows up as an extra path part (data.train.file.path); keep the YAML path only.
    loc = [p for i, p in enumerate(loc)
           if not (p in SOURCE_TAGS and i > 0 and (loc[i - 1] in ("train", "eval") or loc[i - 1].isdigit()))]
    where = ".".join(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        options = _keys_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], options, n=1)
        hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(options)}"
        return f"{where}: unknown key — {hint}"
    if kind == "missing":
        return f"{where}: required setting is missing"
    if kind == "value_error" and not loc:
        return error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    shown = f" (got {value!r})" if not isinstance(value, (dict, list)) else ""
    if isinstance(value, bool) and kind in ("string_type", "literal_error"):
        shown = (f" (got {value}: YAML reads unquoted yes/no/on/off/true/false as a boolean; quote the value, "
                 f"e.g. \"no\")")
    if isinstance(value, datetime.date) and kind == "string_type":
        shown = f" (got {value}: YAML reads an unquoted date as a date; quote it, e.g. \"{value}\")"
    return f"{where}: {error['msg'].lower()}{shown}"


def _keys_at(path: list[str]) -> list[str]:
    """Keys allowed where a YAML path points (for did-you-mean); a data source allows {path, split} or
    {database, query}."""
    sections: list[type[BaseModel]] = [Config]
    for part in path:
        if part.isdigit():  # an item of a list of sources
            continue
        field = sections[0].model_fields.get(part)
        sections = _sections_in(field.annotation) if field else []
        if not sections:
            return []
    return list(dict.fromkeys(key for section in sections for key in section.model_fields if key != "config_path"))


def _sections_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [section for arg in typing.get_args(annotation) for section in _sections_in(arg)]


def resolved_yaml(config: Config) -> str:
    """The config as it will run (defaults filled, variables substituted) for config.yaml, except that a value
    which took a secret variable keeps its ${VAR} reference and a database URL's password reads ***: no secret is
    written, and every other value is exactly what ran (predict and export read it back)."""
    templates = config._secret_templates

    def recorded(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: recorded(item) for key, item in value.items()}
        if isinstance(value, list):
            return [recorded(item) for item in value]
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value) in templates:
            return templates[str(value)]  # also a number that came from a variable (`seed: ${SEED_KEY}`)
        return secrets.mask_url_passwords(value) if isinstance(value, str) else value

    return yaml.safe_dump(recorded(config.model_dump(mode="json")), sort_keys=False)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A config (or any nested value) as setting paths, the way run comparisons and resume messages name them:
    {"a": {"b": [1, {"c": 2}]}} → {"a.b[0]": 1, "a.b[1].c": 2}; empty sections and lists stay as values."""
    if isinstance(node, dict) and node:
        return {key: value for name, child in node.items()
                for key, value in flatten(child, f"{prefix}.{name}" if prefix else str(name)).items()}
    if isinstance(node, list) and node:
        return {key: value for index, child in enumerate(node)
                for key, value in flatten(child, f"{prefix}[{index}]").items()}
    return {prefix: node}
