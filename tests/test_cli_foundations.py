"""``llmquant dtypes / ptq-dynamic / ptq-static / qat`` end to end on a tiny model, and bad inputs."""
import json
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


def test_dtypes_table_and_value():
    code, text = run("dtypes", "--value", "0.1")
    assert code == 0, text
    assert "bfloat16" in text and "65504" in text and "0 01111011 1001101" in text
    code, text = run("dtypes", "--json", "--value", "1000")
    assert code == 0
    data = json.loads(text[text.index("{"):])
    fmt = {r["name"]: r for r in data["formats"]}
    assert fmt["float8_e4m3"]["max"] == float(torch.finfo(torch.float8_e4m3fn).max)
    stored = {r["name"]: r for r in data["value"]}
    assert stored["int8"]["stored"] == 127 and stored["float16"]["stored"] == 1000.0
    assert stored["float8_e4m3"]["stored"] != stored["float8_e4m3"]["stored"]  # NaN: 1000 > 448 overflows


def _logits(path, ids):
    import llmquant
    m = llmquant.load(str(path), dtype="float32", device="cpu")
    with torch.no_grad():
        return m(ids).logits


def test_ptq_dynamic_end_to_end(model_dir, tmp_path):
    out = tmp_path / "dyn"
    code, text = run("ptq-dynamic", "--model", model_dir, "--out", out, "--dataset", tiny.write_calibration(
        tmp_path / "c.jsonl"), "--nsamples", 4, "--seqlen", 32, "--keep-dense", r"layers\.1\.mlp\.down_proj")
    assert code == 0, text
    assert {"config.json", "model.safetensors", "quant_report.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    rep = json.loads((out / "quant_report.json").read_text())
    assert rep["method"] == "w8a8-dynamic" and rep["n_layers"] == 13
    assert rep["kept_dense"] == ["model.layers.1.mlp.down_proj"] and rep["smoothing"]["smoothed"] == 8
    assert "model.layers.1.mlp.down_proj" in text.replace("\n", "")
    ids = torch.randint(3, 256, (1, 20))
    dense = tiny.tiny_model("llama")
    with torch.no_grad():
        ref = dense(ids).logits
    got = _logits(out, ids)
    assert (got - ref).norm() / ref.norm() < 0.02
    code, text = run("ptq-dynamic", "--model", model_dir, "--out", out, "--no-smooth")
    assert code == 2 and "--overwrite" in text
    code, text = run("eval", "--model", out, "--ppl", "--dataset", tiny.write_calibration(tmp_path / "e.jsonl"),
                     "--seqlen", 32, "--max-windows", 2, "--json", "--dtype", "float32")
    assert code == 0, text
    assert json.loads(text.strip().splitlines()[-1])["windows"] == 2


@pytest.mark.parametrize("observer", ["kl", "percentile"])
def test_ptq_static_end_to_end(model_dir, calib_file, tmp_path, observer):
    out = tmp_path / "st"
    code, text = run("ptq-static", "--model", model_dir, "--out", out, "--observer", observer,
                     "--dataset", calib_file, "--nsamples", 4, "--seqlen", 32)
    assert code == 0, text
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "llmquant_w8a8" and cfg["mode"] == "static" and cfg["observer"] == observer
    rep = json.loads((out / "quant_report.json").read_text())
    assert all(r["act_scale"] > 0 for r in rep["layers"])
    ids = torch.randint(3, 256, (1, 20))
    with torch.no_grad():
        ref = tiny.tiny_model("llama")(ids).logits
    assert (_logits(out, ids) - ref).norm() / ref.norm() < 0.1


def test_qat_end_to_end_and_gptq_init(model_dir, calib_file, tmp_path):
    out = tmp_path / "qat"
    code, text = run("qat", "--model", model_dir, "--out", out, "--bits", 4, "--group-size", 32, "--steps", 3,
                     "--batch-size", 2, "--seqlen", 32, "--nsamples", 4, "--dataset", calib_file, "--fp32")
    assert code == 0, text
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == 4 and cfg["group_size"] == 32
    assert cfg["checkpoint_format"] == "gptq_v2"      # asymmetric zero points may be 0: v1 cannot store them
    rep = json.loads((out / "quant_report.json").read_text())
    assert len(rep["history"]) == 3 and rep["config"]["init"] == "rtn"
    ids = torch.randint(3, 256, (1, 20))
    assert torch.isfinite(_logits(out, ids)).all()
    out2 = tmp_path / "qat2"
    code, text = run("qat", "--model", model_dir, "--out", out2, "--bits", 4, "--group-size", 32, "--steps", 0,
                     "--seqlen", 32, "--nsamples", 2, "--dataset", calib_file, "--init", "gptq", "--init-from", out)
    assert code == 0, text
    from llmquant.checkpoint import load_quantized_weights
    a, b = load_quantized_weights(out), load_quantized_weights(out2)
    name = "model.layers.0.mlp.up_proj"
    assert torch.equal(a[name].q, b[name].q) and torch.equal(a[name].scale, b[name].scale)


@pytest.mark.parametrize("args,msg", [
    (["ptq-static", "--observer", "entropy"], "--observer entropy"),
    (["qat", "--bits", "5"], "--bits 5"),
    (["qat", "--init", "gptq"], "--init-from"),
    (["ptq-static", "--dataset", "/nonexistent.jsonl"], "no such file"),
])
def test_bad_inputs_are_one_line_errors(model_dir, tmp_path, args, msg):
    code, text = run(args[0], "--model", model_dir, "--out", tmp_path / "x", *args[1:])
    assert code == 2, text
    assert msg in text and "Traceback" not in text


def test_missing_model_is_an_error(tmp_path):
    code, text = run("ptq-dynamic", "--model", tmp_path / "nope", "--out", tmp_path / "x", "--no-smooth")
    assert code == 2 and "no such file" in text
