"""The offline model fixtures load in transformers, render chat prompts and generate."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def greedy_reply(path, question, max_new_tokens=24):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer, model, tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def argmax_continuation(model, input_ids, max_new_tokens, eos_ids):
    """Greedy decoding written out: append the most likely next token, one full forward per token."""
    ids = input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            if next_id.item() in eos_ids:
                break
    return ids[0, input_ids.shape[1] :]


def test_tiny_model_shape_and_chat_template(tiny_model_dir):
    tokenizer, model, reply = greedy_reply(tiny_model_dir, "What is 2 + 3?", max_new_tokens=5)
    assert model.config.hidden_size == 64 and model.config.num_attention_heads == 2
    assert model.config.head_dim == 32 and model.config.num_hidden_layers == 2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("What is 12 + 30?")["input_ids"]) == "What is 12 + 30?"
    # the reply is the model's greedy continuation of the chat prompt, token for token
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )["input_ids"]  # fmt: skip
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    expected = argmax_continuation(model, prompt_ids, 5, eos_ids)
    assert reply == tokenizer.decode(expected, skip_special_tokens=True)
    assert 1 <= len(expected) <= 5


@pytest.mark.slow
def test_smollm2_instruct_is_a_real_model(smollm2_dir):
    _, model, reply = greedy_reply(smollm2_dir, "What is 2+3? Reply with the number only.")
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    assert "5" in reply
