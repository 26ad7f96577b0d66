"""Causal-LM samples: prompts cut where the answer starts, greedy answers generated on sdpa, never flex_attention."""
from conftest import CHAT_ROWS


def test_a_flex_attention_model_generates_on_sdpa_and_keeps_its_kernel(tiny_causal_lm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.data import tokenize_messages
    from sft.training.samples import MAX_NEW_TOKENS, generate, prompts_of

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    examples = [tokenize_messages(tokenizer, row["messages"], 64) for row in CHAT_ROWS[:3]]
    prompts = prompts_of(examples, 2)
    assert len(prompts) == 2
    for item, example in zip(prompts, examples):
        start = next(i for i, label in enumerate(example["labels"]) if label != -100)
        assert item["prompt"] == example["input_ids"][:start] and item["reference"] == example["input_ids"][start:]

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, attn_implementation="flex_attention")
    model.train()
    kernels = set()
    model.model.layers[0].self_attn.register_forward_hook(
        lambda module, inputs, output: kernels.add(module.config._attn_implementation))
    answers = generate(model, tokenizer, prompts)
    assert kernels == {"sdpa"}
    assert model.config._attn_implementation == "flex_attention" and model.training

    reference = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = [tokenizer.decode(reference.generate(torch.tensor([item["prompt"]]), do_sample=False,
                                                        max_new_tokens=MAX_NEW_TOKENS,
                                                        pad_token_id=tokenizer.pad_token_id)[0, len(item["prompt"]):],
                                     skip_special_tokens=True) for item in prompts]
    assert answers == expected
