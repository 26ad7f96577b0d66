"""Throughput of a run: real (non-padding) tokens per second, token efficiency and, on GPUs with a known peak, MFU —
added to each training log line (terminal, metrics.jsonl) and summed up for the end summary and manifest.json."""
import time

from transformers import TrainerCallback

# Dense bf16/fp16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets, matched against
# torch.cuda.get_device_name() in this order. V100 has no bf16: its entry is fp16.
PEAK_FLOPS = (("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
              ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("A40", 150e12), ("V100", 125e12))


def gpu_peak_flops(device_name: str) -> float | None:
    return next((peak for name, peak in PEAK_FLOPS if name in device_name), None)


def flops_per_token(total_params: int, trainable_params: int, layers: int, hidden: int, mean_length: float) -> float:
    """Training FLOPs per token: forward 2N, backward 2N for activation gradients plus 2N for the weight
    gradients of trained parameters only (6N for full fine-tuning), plus attention 12·L·H·length (the PaLM
    formula, with the mean example length: document masking keeps attention within an example)."""
    return 4 * total_params + 2 * trainable_params + 12 * layers * hidden * mean_length


class ThroughputCallback(TrainerCallback):
    """Counts the tokens of every training forward with a pre-hook on the model: real = attention_mask ones when
    the batch is padded, every token when it is flattened (padding-free); processed = every token fed. Counters
    stay on the device (no synchronisation per step) and are read, and summed over processes, at logging time.

    The run's rate leaves out the first optimizer step (kernel selection, allocator warm-up, compilation)."""

    def __init__(self):
        # real tokens, processed tokens, examples: what the host knows (shapes) plus what only the device knows
        # (mask sums), kept as a device tensor and added up when read
        self.host_counts = [0, 0, 0]
        self.device_counts = None
        self.begin: tuple[float, list[int]] | None = None
        self.run_start: tuple[float, list[int]] | None = None
        self.window_start: tuple[float, list[int]] | None = None
        self.shape = (0, 0, 0, 0)
        self.peak = None
        self.world_size = 1
        self.summary: dict = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch

        from sft.model.loading import count_parameters

        # Eager under training.compile: traced, each new value of the Python counters would recompile the model.
        model.register_forward_pre_hook(torch.compiler.disable(self._count), with_kwargs=True)
        config = getattr(model, "config", None)
        self.shape = (*count_parameters(model), getattr(config, "num_hidden_layers", 0),
                      getattr(config, "hidden_size", 0))
        if torch.cuda.is_available() and (args.bf16 or args.fp16):
            self.peak = gpu_peak_flops(torch.cuda.get_device_name())
        self.world_size = args.world_size
        self.begin = (time.perf_counter(), self._read(args))

    def _count(self, module, args, kwargs):
        import torch

        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not module.training or input_ids is None:
            return
        self.host_counts[1] += input_ids.numel()
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is not None and mask.dim() == 2:  # padded
            on_device = torch.stack([mask.sum(), torch.zeros_like(mask.sum())])
            self.host_counts[2] += mask.shape[0]
        else:  # flattened (padding-free): every token is real; position_ids restart at 0 for each example
            self.host_counts[0] += input_ids.numel()
            if positions is None:
                self.host_counts[2] += input_ids.shape[0]
                return
            examples = (positions == 0).sum()
            on_device = torch.stack([torch.zeros_like(examples), examples])
        self.device_counts = on_device if self.device_counts is None else self.device_counts + on_device

    def _read(self, args) -> list[int]:
        """Totals so far over every process (a collective: called at the same logging steps on every rank)."""
        import torch

        real, examples = self.device_counts.tolist() if self.device_counts is not None else (0, 0)
        totals = [self.host_counts[0] + real, self.host_counts[1], self.host_counts[2] + examples]
        if args.world_size > 1:
            import torch.distributed as dist

            summed = torch.tensor(totals, dtype=torch.int64,
                                  device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(summed)
            totals = summed.tolist()
        return [int(value) for value in totals]

    def on_step_end(self, args, state, control, **kwargs):
        if self.run_start is None:  # the end of the first step (of this session, when resumed)
            self.run_start = (time.perf_counter(), self._read(args))
            self.window_start = self.run_start

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.window_start is None or not ("loss" in logs or "train_runtime" in logs):
            return
        now, totals = time.perf_counter(), self._read(args)
        if "loss" in logs:
            logs.update(self._rates(self.window_start, now, totals))
            self.window_start = (now, totals)
        if "train_runtime" in logs:
            # Past the first step when there was more than one; else the whole (short) run.
            since = self.run_start if totals != self.run_start[1] else self.begin
            self.summary = {"real_tokens": totals[0], "processed_tokens": totals[1], **self._rates(since, now, totals)}

    def _rates(self, since: tuple[float, list[int]], now: float, totals: list[int]) -> dict:
        start, before = since
        real, processed, examples = (totals[i] - before[i] for i in range(3))
        seconds = now - start
        if seconds <= 0 or processed == 0:
            return {}
        rates = {"real_tokens_per_s": real / seconds, "token_efficiency": real / processed}
        if self.peak:
            total, trainable, layers, hidden = self.shape
            per_token = flops_per_token(total, trainable, layers, hidden, real / max(examples, 1))
            # The tokens are summed over every process, so the FLOPs are shared by that many GPUs: MFU is per GPU.
            rates["mfu"] = per_token * real / seconds / (self.peak * self.world_size)
        return rates
