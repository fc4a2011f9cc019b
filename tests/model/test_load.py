import pytest
import torch

from llmquant.errors import InputError
from llmquant.model.load import load_causal_lm, load_tokenizer, resolve_device, resolve_source


def test_resolve_source_kinds(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="no config.json"):
        resolve_source(str(tmp_path))
    f = tmp_path / "w.bin"
    f.write_bytes(b"0")
    with pytest.raises(InputError, match="must be a .gguf"):
        resolve_source(str(f))
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"


def test_hub_id_not_in_cache_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(InputError, match="not found in the Hugging Face cache"):
        load_causal_lm(resolve_source("some-org/some-model"), torch.float32)


def test_cuda_requested_but_absent():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(InputError, match="no CUDA device"):
        resolve_device("cuda")


@pytest.mark.slow
def test_gguf_loads_dense_llama(smollm2_path):
    src = resolve_source(str(smollm2_path))
    assert src.kind == "gguf"
    model = load_causal_lm(src, torch.float32)
    tok = load_tokenizer(src)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None      # dequantized: dense now
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"


def test_hub_id_resolves_through_the_local_cache(monkeypatch, tmp_path):
    """A Hub id is loaded through the normal transformers cache (laid out here by hand, offline)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tiny
    snap = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / "0123456789abcdef"
    tiny.tiny_model_dir(snap)
    (tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    src = resolve_source("tiny-org/tiny-llama")
    assert src.kind == "hub"
    model = load_causal_lm(src, torch.float32)
    assert model.config.num_hidden_layers == 2
    assert load_tokenizer(src)("fox").input_ids
