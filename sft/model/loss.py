"""Chunked cross-entropy for causal-LM training: the loss and its gradients computed from the last hidden states a
chunk of tokens at a time, so the tokens x vocabulary logits never exist whole: at large vocabularies they are
about half of the peak memory (measurements in docs/performance.md).

The gradients are computed in the forward pass, chunk by chunk, the way liger-kernel's fused linear cross-entropy
does (a Triton kernel, GPU only): the same three matrix products per token as the plain loss's forward and backward,
no recomputation. Only the loss changes place; the model's own forward, the attention kernel, LoRA, DDP and
gradient accumulation (num_items_in_batch) stay as they are.
"""
import functools
import logging

from sft.config import Config
from sft.errors import UserError

log = logging.getLogger("sft")

IGNORE_INDEX = -100  # labels Trainer and the collators mark as "no loss here"
CHUNK_BYTES = 2**28  # fp32 logits of one chunk: 256 MiB, e.g. 441 tokens at a 152k vocabulary
# Causal LMs whose forward is exactly logits = lm_head(final hidden state), loss = ForCausalLMLoss(logits, labels):
# no logit soft-capping (gemma2/3), scaling (cohere, granite) or bias. tests/model/test_loss.py checks each against it.
PLAIN_LM_HEAD = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3")


def chunk_tokens(vocab_size: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def off_reason(config: Config, model_type: str) -> str | None:
    """Why training.chunked_loss does not apply to this run (None: it does). Reads no weights: `sft check` asks too."""
    if config.task != "causal_lm":
        return "classification computes no vocabulary-wide logits"
    if config.training.chunked_loss is False:
        return "training.chunked_loss is false"
    if config.training.fsdp:
        return "training.fsdp is set (untested with sharded weights)"
    if model_type not in PLAIN_LM_HEAD:
        return f"{model_type} models are not among those checked against it ({', '.join(PLAIN_LM_HEAD)})"
    targets = config.method.lora.target_modules
    if config.method.name != "full" and isinstance(targets, list) and "lm_head" in targets:
        return "lm_head is in method.lora.target_modules (the loss would miss its adapter)"
    return None


def apply_to(config: Config, model) -> bool:
    """training.chunked_loss resolved for this run and model (logged; the manifest records it)."""
    import torch

    lm = _causal_lm(model)
    reason = off_reason(config, lm.config.model_type)
    head = lm.get_output_embeddings()
    if not reason and not (type(head) is torch.nn.Linear and head.bias is None):
        # e.g. a target_modules pattern that matches lm_head: the loss would use the base weight and miss the adapter.
        reason = (f"the output head is a {type(head).__module__}.{type(head).__name__}, not a plain linear layer "
                  f"(lm_head in method.lora.target_modules?)")
    if reason:
        if config.training.chunked_loss is True:
            raise UserError(f"training.chunked_loss: {reason}; set it to auto or false")
        if config.task == "causal_lm":
            log.info("loss: the model's own cross-entropy (chunked loss off: %s)", reason)
        return False
    use_chunked_loss(model)
    log.info("loss: chunked cross-entropy, %d tokens a chunk (the tokens x vocabulary logits are never held whole)",
             chunk_tokens(head.weight.shape[0]))
    return True


def use_chunked_loss(model) -> None:
    """Make the model's training forwards (train mode, gradients on, labels given) return the chunked loss and no
    logits. Evaluation and generation keep the model's own forward: metrics read the logits there."""
    import torch

    lm = _causal_lm(model)
    batch = {}
    # Eager even under training.compile: the number of chunks follows the batch's length, and a traced loop over
    # them would recompile for every new length.
    eager_loss = torch.compiler.disable(linear_cross_entropy)

    def before_forward(module, args, kwargs):
        batch.clear()  # a forward that raised (out of memory, a Ctrl-C in a notebook) leaves its labels behind
        if not (module.training and torch.is_grad_enabled() and kwargs.get("labels") is not None):
            return None
        batch["labels"], batch["num_items_in_batch"] = kwargs["labels"], kwargs.get("num_items_in_batch")
        no_positions = torch.empty(0, dtype=torch.long, device=kwargs["labels"].device)
        return args, {**kwargs, "labels": None, "logits_to_keep": no_positions}

    def keep_hidden_states(module, args, output):
        if "labels" in batch:
            batch["hidden_states"] = output.last_hidden_state

    def loss_after_forward(module, args, kwargs, output):
        if "labels" not in batch:
            return None
        labels, num_items, hidden = batch.pop("labels"), batch.pop("num_items_in_batch"), batch.pop("hidden_states")
        output.loss = eager_loss(hidden, lm.get_output_embeddings().weight, labels, num_items)
        return output

    lm.register_forward_pre_hook(before_forward, with_kwargs=True)
    lm.get_decoder().register_forward_hook(keep_hidden_states)
    lm.register_forward_hook(loss_after_forward, with_kwargs=True)


def linear_cross_entropy(hidden, weight, labels, num_items_in_batch=None):
    """ForCausalLMLoss(hidden @ weight.T, labels): token t predicts labels[t + 1]; summed over the labelled tokens
    and divided by num_items_in_batch (Trainer's count over the whole optimizer step), else by their number."""
    import torch

    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    divisor = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    return _linear_cross_entropy().apply(hidden, weight, targets, divisor, chunk_tokens(weight.shape[0]))


def _causal_lm(model):
    """The transformers model under a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunk_loss_and_gradient(hidden, weight, targets):
    """Summed loss of one chunk, and d(summed loss)/d(logits). Under autocast the products run in bf16/fp16 like the
    lm_head they replace, and the softmax in fp32 like ForCausalLMLoss."""
    import torch

    logits = (hidden @ weight.T).float()
    labelled = targets != IGNORE_INDEX
    safe_targets = targets.clamp(min=0)
    log_normalizer = logits.logsumexp(dim=-1)
    picked = logits.gather(1, safe_targets[:, None])[:, 0]
    loss = ((log_normalizer - picked) * labelled).sum()
    gradient = logits.sub_(log_normalizer[:, None]).exp_()  # the softmax, in the logits' memory
    gradient[torch.arange(len(targets), device=targets.device), safe_targets] -= 1
    gradient *= labelled[:, None]
    return loss, gradient


@functools.cache
def _linear_cross_entropy():
    """The autograd function, defined on first use (torch is imported lazily: `sft check` imports this module)."""
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """Forward: the loss, and both gradients while each chunk's logits exist. Backward: scale them.
        The gradients stay fp32 and are divided by the token count only after the half-precision products, and
        cast to the inputs' dtype only after the loss scale of fp16 training multiplies them: divided first, a
        softmax entry over 10k tokens would underflow fp16."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, divisor, chunk):
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            fp32 = {"dtype": torch.float32, "device": hidden.device}
            grad_hidden = torch.empty(hidden.shape, **fp32) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros(weight.shape, **fp32) if ctx.needs_input_grad[1] else None  # LoRA: frozen
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                chunk_loss, gradient = _chunk_loss_and_gradient(hidden[rows], weight, targets[rows])
                loss += chunk_loss
                if grad_hidden is not None:
                    grad_hidden[rows] = gradient.to(weight.dtype) @ weight
                if grad_weight is not None:
                    grad_weight += gradient.T.to(hidden.dtype) @ hidden[rows]
                del gradient  # before the next chunk's logits exist: one chunk at a time
            for grad in (grad_hidden, grad_weight):
                if grad is not None:
                    grad /= divisor
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.dtypes = hidden.dtype, weight.dtype
            return loss / divisor

        @staticmethod
        def backward(ctx, grad_loss):
            grad_hidden, grad_weight = ctx.saved_tensors
            hidden_dtype, weight_dtype = ctx.dtypes
            return (None if grad_hidden is None else (grad_hidden * grad_loss).to(hidden_dtype),
                    None if grad_weight is None else (grad_weight * grad_loss).to(weight_dtype),
                    None, None, None)

    return LinearCrossEntropy
