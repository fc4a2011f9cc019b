"""llmquant eval / generate / inspect through the CLI: output contract and one-line errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent / "runtime"))
from rt_helpers import write_checkpoint  # noqa: E402

from llmquant.cli import app  # noqa: E402

try:
    runner = CliRunner(mix_stderr=False)
except TypeError:                      # click >= 8.2 keeps stderr apart already
    runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "ck"
    report = {"modules": [{"name": "model.layers.0.self_attn.q_proj", "loss": 0.5, "damp": 0.01,
                           "fallback": None, "seconds": 0.1}]}
    return write_checkpoint(d, report=report)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("txt") / "t.txt"
    p.write_text("the cat sat on the mat. " * 200)
    return p


def test_eval_json_prints_only_the_json(ckpt, text):
    r = runner.invoke(app, ["eval", "--model", str(ckpt), "--ppl", "--dataset", str(text), "--seqlen", "64",
                            "--max-windows", "3", "--json", "--device", "cpu", "--dtype", "float32"])
    assert r.exit_code == 0, r.stderr
    obj = json.loads(r.stdout)
    assert set(obj) == {"ppl", "windows", "tokens"}
    assert obj["windows"] == 3 and obj["tokens"] == 3 * 63 and obj["ppl"] > 1
    assert r.stdout.strip().count("\n") == 0


def test_eval_table_and_kernel_flag(ckpt, text):
    r = runner.invoke(app, ["eval", "--model", str(ckpt), "--ppl", "--dataset", str(text), "--seqlen", "64",
                            "--max-windows", "2", "--kernel", "reference", "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    assert "reference" in r.stderr and r.stdout == ""


def test_generate_streams_and_reports_speed(ckpt):
    r = runner.invoke(app, ["generate", "--model", str(ckpt), "--prompt", "the cat", "--max-new-tokens", "6", "--threads", "1",
                            "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    assert "prefill:" in r.stderr and "decode:" in r.stderr and "tok/s" in r.stderr


def test_inspect_table_and_plot(ckpt, tmp_path):
    png = tmp_path / "chart.png"
    r = runner.invoke(app, ["inspect", str(ckpt), "--plot", str(png)])
    assert r.exit_code == 0, r.stderr
    assert "gptq_v2" in r.stderr and "q_proj" in r.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
    r = runner.invoke(app, ["inspect", str(ckpt), "--json", "--plot", str(png)])
    info = json.loads(r.stdout)
    assert info["bits"] == 4 and info["n_quantized"] == 14


@pytest.mark.parametrize("command", ["eval", "generate", "inspect"])
def test_bad_input_is_one_line_nonzero(tmp_path, command, text):
    bad = tmp_path / "notackpt"
    bad.mkdir()
    (bad / "readme.txt").write_text("hi")
    args = {"eval": ["eval", "--model", str(bad), "--ppl", "--dataset", str(text)],
            "generate": ["generate", "--model", str(bad), "--prompt", "x"],
            "inspect": ["inspect", str(bad)]}[command]
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    assert "Traceback" not in r.stderr + r.stdout
    assert "error:" in r.stderr and str(bad) in r.stderr.replace("\n", "")


def test_truncated_checkpoint_cli(tmp_path, text):
    d = write_checkpoint(tmp_path / "ck")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-777])
    r = runner.invoke(app, ["eval", "--model", str(d), "--ppl", "--dataset", str(text), "--seqlen", "64"])
    assert r.exit_code == 2 and "model.safetensors" in r.stderr.replace("\n", "") and "Traceback" not in r.stderr


def test_threads_flag_is_restored(ckpt):
    import torch
    before = torch.get_num_threads()
    r = runner.invoke(app, ["generate", "--model", str(ckpt), "--prompt", "a", "--max-new-tokens", "2",
                            "--threads", "1"])
    assert r.exit_code == 0, r.stderr
    assert torch.get_num_threads() == before
    r = runner.invoke(app, ["generate", "--model", str(ckpt), "--prompt", "a", "--threads", "-1"])
    assert r.exit_code == 2 and "--threads" in r.stderr
