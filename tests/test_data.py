import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

from llmquant.data import calibration_windows, load_corpus, tokenize_stream  # noqa: E402
from llmquant.errors import InputError  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


def _contains(hay: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(hay[i:i + n] == needle for i in range(len(hay) - n + 1))


def test_document_windows_come_from_long_enough_documents(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    docs = ["short text"] * 5 + [f"doc {i} " + tiny.TEXT[: 200 + 40 * i] for i in range(6)]
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    c = load_corpus(str(f))
    w = calibration_windows(tok, c, 12, 24, seed=3)
    assert w.shape == (12, 24)
    encs = [tok(d, add_special_tokens=False).input_ids for d in docs]
    for row in w.tolist():
        assert any(len(e) > 24 and _contains(e, row) for e in encs)
    assert torch.equal(w, calibration_windows(tok, c, 12, 24, seed=3))
    assert not torch.equal(w, calibration_windows(tok, c, 12, 24, seed=4))


def test_stream_windows_are_slices_of_the_whole_text(tmp_path, tok):
    f = tmp_path / "t.txt"
    f.write_text(tiny.TEXT)
    c = load_corpus(str(f))
    ids = tokenize_stream(tok, c)[0].tolist()
    w = calibration_windows(tok, c, 5, 16, seed=0)
    for row in w.tolist():
        assert _contains(ids, row)


def test_shared_data_files_load(shared_data):
    c4 = load_corpus(str(shared_data / "c4-train-1000.jsonl"))
    assert len(c4.documents) == 1000 and not c4.is_stream
    wiki = load_corpus(str(shared_data / "wikitext2-test.raw"))
    assert wiki.is_stream and "Robert Boulter" in wiki.documents[0][:200]


@pytest.mark.parametrize("content,suffix,match", [
    ("", ".txt", "holds no text"), ("{\"no_text\": 1}\n", ".jsonl", "'text' field"), ("x", ".csv", "unknown file type"),
])
def test_bad_files(tmp_path, content, suffix, match):
    f = tmp_path / f"f{suffix}"
    f.write_text(content)
    with pytest.raises(InputError, match=match):
        load_corpus(str(f))


def test_too_short(tmp_path, tok):
    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps({"text": "tiny"}) + "\n")
    with pytest.raises(InputError, match="no document is longer than --seqlen 64"):
        calibration_windows(tok, load_corpus(str(f)), 4, 64, 0)


def test_named_dataset_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(InputError, match="pass a local file instead"):
        load_corpus("c4")
