"""Reproducibility: seed every generator before any model or data object exists, and, when asked, make GPU
kernels deterministic. What applied goes into the manifest."""
import os

# cuBLAS picks reduction orders by workspace; a fixed workspace config makes its GEMMs deterministic
# (https://docs.nvidia.com/cuda/cublas/#results-reproducibility). Must be set before cuBLAS initialises.
CUBLAS_WORKSPACE = ":4096:8"


def seed_everything(seed: int, deterministic: bool) -> dict:
    """Seed python, numpy and torch (CPU and every GPU); with `deterministic`, also switch torch to deterministic
    kernels. Returns the settings in force, for the manifest.

    Why here and not in Trainer: Trainer seeds in its constructor, after the model is built, so a new classifier
    head or LoRA adapter would be initialised from whatever state the global generator was left in."""
    import torch
    from transformers import set_seed

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cudnn.benchmark = False
    # Strict, not warn_only: an op without a deterministic kernel fails at once, naming the op, instead of
    # silently breaking the promise hours later. Set both ways: the config decides, also for a second run in
    # the same notebook process.
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    set_seed(seed)
    return {"seed": seed, "deterministic": deterministic,
            "torch_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
