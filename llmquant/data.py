"""Text for calibration and evaluation: named datasets (through ``datasets``) or local files.

* documents (``c4``, ``.jsonl`` with a ``text`` field, ``.parquet``): calibration draws a random
  document longer than the window, then a random window inside it -- the GPTQ paper's C4 sampler.
* one stream (``wikitext2``, ``.txt`` / ``.raw``): the text is tokenized once and windows are
  drawn from anywhere in it -- the paper's WikiText-2 sampler.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from llmquant.errors import InputError

C4_FILE = "en/c4-train.00000-of-01024.json.gz"


@dataclass
class Corpus:
    name: str
    documents: list[str]        # one entry for a stream
    is_stream: bool


def load_corpus(spec: str, split: str = "train") -> Corpus:
    """``spec``: ``c4``, ``wikitext2`` or a path to ``.txt``/``.raw``/``.jsonl``/``.parquet``."""
    if spec in ("c4", "wikitext2"):
        return _load_named(spec, split)
    p = Path(spec).expanduser()
    if not p.exists():
        raise InputError(f"--dataset {spec}: no such file; use c4, wikitext2 or a path to a .txt/.raw/.jsonl/.parquet file")
    if p.is_dir():
        raise InputError(f"--dataset {spec}: is a directory; pass a .txt/.raw/.jsonl/.parquet file")
    suffix = p.suffix.lower()
    if suffix in (".txt", ".raw"):
        text = p.read_text(encoding="utf-8", errors="replace")
        docs, stream = [text], True
    elif suffix == ".jsonl":
        docs = []
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InputError(f"--dataset {spec}: line {n} is not a JSON object with a 'text' field") from None
        stream = False
    elif suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(p)
        if "text" not in table.column_names:
            raise InputError(f"--dataset {spec}: parquet file has no 'text' column (columns: {table.column_names})")
        docs, stream = [str(t) for t in table.column("text").to_pylist()], False
    else:
        raise InputError(f"--dataset {spec}: unknown file type '{suffix}'; use .txt, .raw, .jsonl or .parquet")
    if not any(d.strip() for d in docs):
        raise InputError(f"--dataset {spec}: the file holds no text; give a file with calibration text")
    return Corpus(p.name, docs, stream)


def _load_named(name: str, split: str) -> Corpus:
    try:
        import datasets
        if name == "c4":
            ds = datasets.load_dataset("allenai/c4", data_files={split: C4_FILE}, split=split)
            return Corpus("c4", list(ds["text"]), False)
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return Corpus("wikitext2", ["\n\n".join(ds["text"])], True)
    except Exception as e:  # offline, not cached, or the hub refused
        msg = str(e).strip().splitlines()[0][:150] if str(e).strip() else type(e).__name__
        raise InputError(f"--dataset {name}: cannot load it through datasets ({msg}); "
                         "pass a local file instead, e.g. --dataset ../shared/data/c4-train-1000.jsonl") from None


def tokenize_stream(tokenizer, corpus: Corpus) -> torch.Tensor:
    """The whole text as one ``[1, N]`` tensor of token ids (for perplexity)."""
    text = "\n\n".join(corpus.documents) if not corpus.is_stream else corpus.documents[0]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return ids


def calibration_windows(tokenizer, corpus: Corpus, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``[nsamples, seqlen]`` token windows, drawn as the GPTQ paper does (``random.seed(seed)``)."""
    if nsamples < 1 or seqlen < 2:
        raise InputError(f"--nsamples {nsamples} / --seqlen {seqlen}: need nsamples >= 1 and seqlen >= 2")
    rng = random.Random(seed)
    if corpus.is_stream:
        ids = tokenize_stream(tokenizer, corpus)[0]
        if ids.numel() <= seqlen + 1:
            raise InputError(f"--dataset {corpus.name}: only {ids.numel()} tokens, too short for --seqlen {seqlen}; "
                             "give more text or lower --seqlen")
        starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
        return torch.stack([ids[s:s + seqlen] for s in starts])
    enc = tokenizer(corpus.documents, add_special_tokens=False).input_ids
    if not any(len(e) > seqlen for e in enc):
        raise InputError(f"--dataset {corpus.name}: no document is longer than --seqlen {seqlen} tokens; "
                         "give longer documents or lower --seqlen")
    out = []
    for _ in range(nsamples):
        while True:
            e = enc[rng.randint(0, len(enc) - 1)]
            if len(e) > seqlen:
                break
        s = rng.randint(0, len(e) - seqlen - 1)
        out.append(torch.tensor(e[s:s + seqlen]))
    return torch.stack(out)
