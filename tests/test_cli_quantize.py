"""End-to-end ``llmquant gptq`` / ``rtn`` on tiny models, and every bad input the issue names."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

from llmquant.cli import app  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny-llama")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return tiny.write_calibration(tmp_path_factory.mktemp("d") / "cal.jsonl")


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def base(model_dir, calib_file, out, *extra):
    return ["gptq", "--model", model_dir, "--out", out, "--dataset", calib_file, "--nsamples", 4,
            "--seqlen", 32, "--group-size", 32, *extra]


def test_gptq_end_to_end_checkpoint_loads_to_the_same_logits(model_dir, calib_file, tmp_path):
    out = tmp_path / "q"
    code, text = run(*base(model_dir, calib_file, out, "--bits", 4, "--asym"))
    assert code == 0, text
    files = sorted(p.name for p in out.iterdir())
    assert {"config.json", "quantize_config.json", "model.safetensors", "quant_report.json",
            "tokenizer.json"} <= set(files)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == 4 and cfg["group_size"] == 32
    assert cfg["checkpoint_format"] == "gptq_v2" and cfg["sym"] is False and cfg["desc_act"] is True
    rep = json.loads((out / "quant_report.json").read_text())
    assert len(rep["modules"]) == 14 and rep["totals"]["fallbacks"] == []
    assert (out / "layer_error.png").read_bytes()[:4] == b"\x89PNG"
    assert all(m["tokens"] == 4 * 32 and m["damp"] == 0.01 for m in rep["modules"])
    # the runtime's reader gives the same dequantized weights the pipeline computed with
    import llmquant
    q = llmquant.load(str(out), device="cpu", kernel="reference", dtype="float32")
    ids = torch.randint(3, 256, (1, 24))
    from llmquant.checkpoint import load_quantized_weights
    qws = load_quantized_weights(str(out))
    dense = tiny.tiny_model("llama")
    with torch.no_grad():
        for name, qw in qws.items():
            dict(dense.named_modules())[name].weight.copy_(qw.dequantize())
        for n, p in dense.named_parameters():
            if not any(n.startswith(k) for k in qws):
                p.copy_(p.half().float())        # unquantized tensors are stored in float16
        a, b = q(ids).logits.float(), dense(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_rtn_and_recipe_with_flag_override(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("bits: 8\ngroup-size: 64\nsym: true\n")
    out = tmp_path / "r"
    code, text = run("rtn", "--model", model_dir, "--out", out, "--config", recipe, "--bits", 4)
    assert code == 0, text
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["checkpoint_format"]) == (4, 64, True, "gptq")


def test_existing_output_is_left_untouched_without_overwrite(model_dir, calib_file, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, text = run(*base(model_dir, calib_file, out))
    assert code == 2 and "--overwrite" in text
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    code, text = run(*base(model_dir, calib_file, out, "--overwrite"))
    assert code == 0, text
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()


def test_interrupt_leaves_nothing_that_looks_complete(model_dir, calib_file, tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):              # Ctrl-C while the weights are being written
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    out = tmp_path / "int"
    code, text = run(*base(model_dir, calib_file, out))
    assert code == 130
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []          # no temp directory left behind


@pytest.mark.parametrize("case,extra,match", [
    ("missing model", ["--model", "/nonexistent/model"], "no such file or directory"),
    ("bad bits", ["--bits", "5"], "--bits 5 is not supported"),
    ("group size 0", ["--group-size", "0"], "--group-size 0 is invalid"),
    ("group size -2", ["--group-size", "-2"], "--group-size -2 is invalid"),
    ("missing data", ["--dataset", "/nonexistent.jsonl"], "--dataset /nonexistent.jsonl: no such file"),
    ("cuda absent", ["--device", "cuda"], "CUDA was requested but no CUDA device"),
    ("v1 asym", ["--asym", "--format", "gptq"], "cannot hold zero point 0"),
])
def test_bad_input_one_line_error(model_dir, calib_file, tmp_path, case, extra, match):
    if case == "cuda absent" and torch.cuda.is_available():
        pytest.skip("CUDA present")
    args = base(model_dir, calib_file, tmp_path / "o")
    for i in range(0, len(extra), 2):
        flag = extra[i]
        if flag in args and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            args[args.index(flag) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    code, text = run(*args)
    assert code == 2, text
    assert match in text.replace("\n", " ")
    assert "Traceback" not in text
    assert not (tmp_path / "o").exists()


def test_bad_calibration_text(model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    for f, match in ((empty, "holds no text"), (short, "too short for --seqlen")):
        code, text = run("gptq", "--model", model_dir, "--out", tmp_path / "o", "--dataset", f, "--seqlen", 64)
        assert code == 2 and match in text.replace("\n", " "), text
        assert not (tmp_path / "o").exists()


def test_not_a_causal_lm(tmp_path):
    d = tmp_path / "notlm"
    d.mkdir()
    code, text = run("rtn", "--model", d, "--out", tmp_path / "o")
    assert code == 2 and "no config.json" in text
    from transformers import ViTConfig
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(d)
    tiny.tiny_tokenizer().save_pretrained(d)
    code, text = run("rtn", "--model", d, "--out", tmp_path / "o")
    assert code == 2 and "not a causal language model" in text, text


def test_nan_activations_name_the_layer(tmp_path, calib_file):
    m = tiny.tiny_model("llama")
    with torch.no_grad():
        m.model.layers[1].self_attn.o_proj.weight.fill_(float("nan"))
    d = tmp_path / "nan"
    m.save_pretrained(d)
    tiny.tiny_tokenizer().save_pretrained(d)
    code, text = run("gptq", "--model", d, "--out", tmp_path / "o", "--dataset", calib_file, "--nsamples", 2,
                     "--seqlen", 16, "--group-size", 32)
    assert code == 2 and "NaN/Inf" in text and "model.layers.1" in text, text
    assert not (tmp_path / "o").exists()


def test_console_script_exits_nonzero_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmquant.cli", "gptq", "--model", str(tmp_path / "none"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "no such file or directory" in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1


def test_gptq_eval_stores_perplexity_in_report(model_dir, calib_file, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(tiny.TEXT * 3)
    recipe = tmp_path / "e.yaml"
    recipe.write_text(f"eval-dataset: {text}\neval-seqlen: 64\neval-windows: 3\n")
    out = tmp_path / "ev"
    code, txt = run(*base(model_dir, calib_file, out, "--eval", "--config", recipe, "--device", "cpu"))
    assert code == 0, txt
    rep = json.loads((out / "quant_report.json").read_text())
    assert rep["eval"]["windows"] == 3 and rep["eval"]["dtype"] == "float32"
    # independent check: perplexity of the written checkpoint, computed here
    import math
    import llmquant
    from llmquant.data import load_corpus, tokenize_stream
    m = llmquant.load(str(out), device="cpu", dtype="float32", kernel="reference")
    ids = tokenize_stream(tiny.tiny_tokenizer(), load_corpus(str(text)))
    nll = 0.0
    with torch.no_grad():
        for w in range(3):
            x = ids[:, w * 64:(w + 1) * 64]
            nll += m(x, labels=x).loss.item()
    assert math.isclose(rep["eval"]["ppl"], math.exp(nll / 3), rel_tol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gptq_on_cuda_end_to_end(model_dir, calib_file, tmp_path):
    """``--device cuda``: the report says cuda, and the checkpoint runs on the GPU (int4 kernel where
    it applies) with the logits of the float32 reference path on CPU."""
    out = tmp_path / "q"
    code, text = run(*base(model_dir, calib_file, out, "--bits", 4, "--asym", "--device", "cuda"))
    assert code == 0, text
    rep = json.loads((out / "quant_report.json").read_text())
    assert rep["device"] == "cuda" and rep["totals"]["fallbacks"] == []
    import llmquant
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    ref = llmquant.load(str(out), device="cpu", kernel="reference", dtype="float32")
    gpu = llmquant.load(str(out), device="cuda", dtype="bfloat16")
    with torch.no_grad():
        a = ref(ids).logits.float()
        b = gpu(ids.cuda()).logits.float().cpu()
    assert ((a - b).abs().max() / a.abs().max()).item() < 5e-2
