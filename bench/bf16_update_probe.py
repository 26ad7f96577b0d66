"""Probe (not a test): would bf16 trained weights (with fp32 optimizer states) lose updates? One AdamW step on a
Qwen2-0.5B-sized weight matrix (896 x 4096, std 0.02) with the same gradient, in fp32 and in bf16, at sft's default
learning rate and two larger ones; prints the share of weights the step changed.

    .venv/bin/python bench/bf16_update_probe.py

bf16 keeps 8 bits of mantissa: an update smaller than about 1/256 of the weight rounds away.
"""
import torch


def changed_share(weight: torch.Tensor, gradient: torch.Tensor, learning_rate: float) -> float:
    parameter = torch.nn.Parameter(weight.clone())
    optimizer = torch.optim.AdamW([parameter], lr=learning_rate, weight_decay=0.0)
    parameter.grad = gradient.to(weight.dtype)
    optimizer.step()
    return (parameter.detach() != weight).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4096, 896) * 0.02
    gradient = torch.randn_like(weight) * 1e-3
    for learning_rate in (2e-5, 1e-4, 2e-4):
        shares = {dtype: changed_share(weight.to(dtype), gradient, learning_rate)
                  for dtype in (torch.float32, torch.bfloat16)}
        print(f"learning rate {learning_rate:g}: one AdamW step changed {100 * shares[torch.float32]:.1f}% of fp32 "
              f"weights, {100 * shares[torch.bfloat16]:.1f}% of bf16 weights")


if __name__ == "__main__":
    main()
