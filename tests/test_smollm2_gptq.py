"""Integration (slow): the real SmolLM2-135M through ``llmquant gptq`` and ``rtn`` end to end."""
import json

import pytest
from typer.testing import CliRunner

from llmquant.cli import app

pytestmark = pytest.mark.slow


def test_gptq_on_smollm2_beats_rtn(smollm2_path, shared_data, tmp_path):
    from llmquant.runtime.evaluate import evaluate_checkpoint
    runner = CliRunner()
    common = ["--model", str(smollm2_path), "--bits", "4", "--group-size", "128", "--asym"]
    r = runner.invoke(app, ["gptq", *common, "--out", str(tmp_path / "g"), "--dataset",
                            str(shared_data / "c4-train-1000.jsonl"), "--nsamples", "16", "--seqlen", "256"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["rtn", *common, "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "g" / "quant_report.json").read_text())
    assert rep["totals"]["modules"] == 210 and rep["totals"]["fallbacks"] == []
    assert 108 < rep["totals"]["weights_mb"] < 116          # ~112 MB, lm_head tied and stored once
    assert any("not multiples of --group-size 128" in w for w in rep["warnings"])
    wiki = str(shared_data / "wikitext2-test.raw")
    g = evaluate_checkpoint(str(tmp_path / "g"), wiki, 2048, 2, "cpu", dtype="float32")["ppl"]
    q = evaluate_checkpoint(str(tmp_path / "r"), wiki, 2048, 2, "cpu", dtype="float32")["ppl"]
    assert g < q, (g, q)
