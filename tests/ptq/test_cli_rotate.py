"""``llmquant ptq-static --rotate``: the default rotates the MLP down projections, 'none' turns it off,
and the rotated checkpoint loads through ``llmquant.load`` and ``llmquant eval``."""
import json
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parents[1]))
import tiny  # noqa: E402

from llmquant.cli import app  # noqa: E402

runner = CliRunner()


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def test_ptq_static_rotates_down_proj_by_default_and_none_turns_it_off(tmp_path):
    model_dir = tiny.tiny_model_dir(tmp_path / "tiny-llama")
    cal = tiny.write_calibration(tmp_path / "cal.jsonl")
    out = tmp_path / "rot"
    code, text = run("ptq-static", "--model", model_dir, "--out", out, "--dataset", cal, "--nsamples", 4, "--seqlen", 32)
    assert code == 0, text
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["rotated"] and all(n.endswith("mlp.down_proj") for n in qc["rotated"])
    import llmquant
    m = llmquant.load(str(out), dtype="float32", device="cpu")
    assert m.model.layers[0].mlp.down_proj.rotation is not None
    ids = torch.randint(3, 256, (1, 20))
    with torch.no_grad():
        ref = tiny.tiny_model("llama")(ids).logits
        got = m(ids).logits
    assert (got - ref).norm() / ref.norm() < 0.1
    code, text = run("eval", "--model", out, "--ppl", "--dataset", cal, "--seqlen", 32, "--max-windows", 2,
                     "--json", "--dtype", "float32")
    assert code == 0, text
    assert json.loads(text.strip().splitlines()[-1])["windows"] == 2
    plain = tmp_path / "plain"
    code, text = run("ptq-static", "--model", model_dir, "--out", plain, "--dataset", cal, "--nsamples", 4,
                     "--seqlen", 32, "--rotate", "none")
    assert code == 0, text
    assert "rotated" not in json.loads((plain / "config.json").read_text())["quantization_config"]
    code, text = run("ptq-static", "--model", model_dir, "--out", tmp_path / "bad", "--dataset", cal,
                     "--rotate", "(")
    assert code == 2 and "--rotate" in text
