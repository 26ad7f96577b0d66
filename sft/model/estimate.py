"""Preflight memory estimate (`sft check`): peak memory of one training process from the model's config.json alone
(no weights, no torch), whether it fits the GPU, and the change that makes it fit.

Peak = weights + gradients + optimizer states (AdamW: two fp32 moments) + activations and logits for the
largest batch, from per-token costs read off measured peaks; docs/performance.md has where each cost comes from and
how close the estimate came (tests/model/test_estimate.py checks it)."""
import json
from dataclasses import dataclass

from sft.config import Config
from sft.errors import UserError

GIB = 2**30
ACTIVATION_BYTES = {"half": 64, "fp32": 128}  # x hidden, per layer and token
LOGIT_BYTES = {"half": 14, "fp32": 12}  # x vocabulary, per token: logits, their fp32 copy, softmax and gradient
CHUNKED_LOGIT_BYTES = {"half": 8, "fp32": 6}  # x vocabulary, per token of one chunk
CHECKPOINTED_BYTES = {"half": 4, "fp32": 4}  # x hidden, per layer and token: only each layer's fp32 input is kept
# Leave this share of the GPU free: the CUDA context, and the caching allocator's fragmentation when every batch
# has another shape (the 1.5B row of NOTES.md ran out of memory at an estimated 81% of 80 GB).
HEADROOM = 0.15
BERT_LIKE = ("bert", "roberta", "distilbert", "electra", "deberta", "xlm-roberta", "mpnet")
QLORA_BYTES_PER_WEIGHT = 0.5 + 4 / 64  # 4-bit values plus an fp32 scale per block of 64
# Tokens per causal_lm batch when training.max_tokens_per_batch is auto: ~8k filled an H100; on CPU a packed
# batch's attention costs (sum of lengths)^2, so the smallest budget was fastest (docs/performance.md).
GPU_TOKEN_BUDGET, CPU_TOKEN_BUDGET = 8192, 1024


@dataclass
class ModelShape:
    """What the estimate needs from config.json."""
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied_embeddings: bool
    mlp_matrices: int = 3  # gated MLPs (Llama, Qwen2, Mistral) have three projections; BERT/GPT-style ones two

    @property
    def linear_params(self) -> int:
        """Weights of the transformer layers' linear projections (what LoRA adapts and QLoRA quantizes)."""
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return self.layers * (attention + self.mlp_matrices * self.hidden * self.intermediate)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.layers * 2 * self.hidden + self.hidden

    def lora_params(self, rank: int) -> int:
        """LoRA on every linear layer (all-linear): rank x (in + out) per projection."""
        head_dim = self.hidden // self.heads
        attention = 2 * (self.hidden + self.hidden) + 2 * (self.hidden + self.kv_heads * head_dim)
        return self.layers * rank * (attention + self.mlp_matrices * (self.hidden + self.intermediate))


def shape_from_config(config_json: dict) -> ModelShape:
    """Llama/Qwen2/Mistral-style and BERT-style configs (the keys transformers uses for both)."""
    try:
        hidden = config_json["hidden_size"]
        heads = config_json["num_attention_heads"]
        return ModelShape(layers=config_json["num_hidden_layers"], hidden=hidden,
                          intermediate=config_json.get("intermediate_size", 4 * hidden),
                          vocab=config_json["vocab_size"], heads=heads,
                          kv_heads=config_json.get("num_key_value_heads") or heads,
                          tied_embeddings=config_json.get("tie_word_embeddings", True),
                          mlp_matrices=2 if config_json.get("model_type") in BERT_LIKE else 3)
    except KeyError as missing:
        raise UserError(f"model config.json has no {missing}: cannot estimate memory for this architecture") from None


@dataclass
class Estimate:
    parts: dict[str, float]  # bytes
    tokens: int  # per batch (the largest)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def estimate_memory(shape: ModelShape, method: str, tokens: int, *, half_precision: bool = True,
                    gradient_checkpointing: bool = False, lora_rank: int = 16, num_gpus: int = 1,
                    classification: bool = False, score_entries: int = 0, chunked_loss: bool = False) -> Estimate:
    """Peak bytes of one process. method: full, lora or qlora; num_gpus > 1 means FSDP (full_shard) over them.
    score_entries: attention-score entries per head and layer when the kernel materialises them (eager, and sdpa
    on CPU: tokens² for a flattened batch); 0 for flash/flex/efficient kernels, which never hold them."""
    precision = "half" if half_precision else "fp32"
    base_bytes = 2 if half_precision else 4  # LoRA/QLoRA keep the frozen base in the compute dtype
    trainable = shape.params if method == "full" else shape.lora_params(lora_rank)
    if method == "full":
        weights = 4 * shape.params  # fp32 master weights under autocast
    elif method == "lora":
        weights = base_bytes * shape.params + 4 * trainable
    else:  # qlora: the layers' linear weights in 4 bits; embeddings, norms and the head stay in the compute dtype
        weights = (QLORA_BYTES_PER_WEIGHT * shape.linear_params + base_bytes * (shape.params - shape.linear_params)
                   + 4 * trainable)
    sharded = num_gpus if method == "full" else 1
    per_layer = (CHECKPOINTED_BYTES[precision] if gradient_checkpointing else ACTIVATION_BYTES[precision]) * shape.hidden
    activations = tokens * shape.layers * per_layer
    if gradient_checkpointing:  # one layer's full activations exist again while it is recomputed
        activations += tokens * ACTIVATION_BYTES[precision] * shape.hidden
    if classification:
        logits = 0
    elif chunked_loss:
        from sft.model.loss import chunk_tokens

        head_gradient = 4 * shape.vocab * shape.hidden if method == "full" else 0
        logits = min(tokens, chunk_tokens(shape.vocab)) * shape.vocab * CHUNKED_LOGIT_BYTES[precision] + head_gradient
    else:
        logits = tokens * shape.vocab * LOGIT_BYTES[precision]
    # Softmax probabilities, kept for the backward pass in the compute dtype (fp32 under eager on CPU).
    scores = shape.layers * shape.heads * score_entries * (4 if not half_precision else 2)
    return Estimate({"weights": weights / sharded, "gradients": 4 * trainable / sharded,
                     "optimizer states": 8 * trainable / sharded, "activations": activations, "logits": logits,
                     "attention scores": scores}, tokens)


def fits(estimate: Estimate, gpu_bytes: float) -> bool:
    return estimate.total <= (1 - HEADROOM) * gpu_bytes


def batch_tokens(config: Config, budget: int | None) -> int:
    """Tokens in the largest batch: the token budget, or batch_size examples of max_length (padded worst case)."""
    return budget if budget else config.training.batch_size * config.data.max_length


def what_fits(config: Config, shape: ModelShape, tokens: int, gpu_bytes: float,
              chunked_loss: bool = False) -> str | None:
    """The first single change (in the order a user would try them) that makes the run fit, as an instruction."""
    method = config.method.name
    settings = {"half_precision": True, "gradient_checkpointing": config.training.gradient_checkpointing,
                "lora_rank": config.method.lora.r, "classification": config.task == "classification",
                "chunked_loss": chunked_loss}

    def estimate(**changes):
        options = {**settings, "method": method, "tokens": tokens, **changes}
        return estimate_memory(shape, options.pop("method"), options.pop("tokens"), **options)

    candidates = []
    if not config.training.gradient_checkpointing:
        candidates.append(("training.gradient_checkpointing=true", estimate(gradient_checkpointing=True)))
    smaller = tokens // 2
    while smaller >= config.data.max_length and config.task == "causal_lm":
        candidates.append((f"training.max_tokens_per_batch={smaller}", estimate(tokens=smaller)))
        smaller //= 2
    if method == "full":
        candidates.append(("method.name=lora", estimate(method="lora")))
    if method in ("full", "lora"):
        candidates.append(("method.name=qlora", estimate(method="qlora")))
    if method == "full":
        for gpus in (2, 4, 8):  # FSDP turns the chunked loss off
            candidates.append((f"training.fsdp='full_shard auto_wrap' over {gpus} GPUs (torchrun)",
                               estimate(num_gpus=gpus, chunked_loss=False)))
    for change, candidate in candidates:
        if fits(candidate, gpu_bytes):
            return f"{change} ({size(candidate.total)})"
    return None


def uses_chunked_loss(config: Config, model_config: dict) -> bool:
    """Whether training.chunked_loss will be on for this model (sft/model/loss.py decides the same way at train
    time)."""
    from sft.model.loss import off_reason

    return off_reason(config, model_config.get("model_type", "")) is None


def read_model_config(config: Config) -> dict | None:
    """config.json of the model: a local folder, a `pkg:` package, or the hub cache (never a download)."""
    from sft.model.hub import local_model_folder

    folder = local_model_folder(config)
    file = folder / "config.json" if folder else None
    return json.loads(file.read_text()) if file and file.is_file() else None


def size(value: float) -> str:
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / 2**20:.0f} MiB"
