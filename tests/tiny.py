"""Tiny random models of every supported architecture, and a tiny trained tokenizer, for unit tests."""
from __future__ import annotations

from pathlib import Path

import torch

TEXT = ("The quick brown fox jumps over the lazy dog. " * 4 +
        "Quantization maps real numbers to a small set of integers. GPTQ uses second order information. ") * 8


def tiny_config(arch: str):
    import transformers as T
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        return T.LlamaConfig(**common)
    if arch == "mistral":
        return T.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return T.Qwen2Config(**common)
    if arch == "qwen3":
        return T.Qwen3Config(**common, head_dim=16)
    if arch == "gemma":
        return T.GemmaConfig(**common, head_dim=16)
    if arch == "gemma2":
        return T.Gemma2Config(**common, head_dim=16, sliding_window=64)
    if arch == "gemma3":
        return T.Gemma3TextConfig(**common, head_dim=16, sliding_window=64)
    if arch == "phi3":
        return T.Phi3Config(**common, pad_token_id=0)
    if arch == "opt":
        return T.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=64, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    if arch == "gpt2":
        return T.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                            bos_token_id=1, eos_token_id=2)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "opt", "gpt2", "gpt_neox"]


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    return m.eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_model_dir(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    m = tiny_model(arch, seed)
    m.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_calibration(path: Path, docs: int = 40) -> Path:
    import json
    with open(path, "w") as f:
        for i in range(docs):
            f.write(json.dumps({"text": f"Document {i}. " + TEXT}) + "\n")
    return path
