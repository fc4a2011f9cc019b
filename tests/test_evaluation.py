import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

from llmquant.evaluation import perplexity  # noqa: E402


def test_perplexity_equals_exp_of_transformers_mean_loss():
    model = tiny.tiny_model("llama")
    ids = torch.randint(0, 256, (1, 5 * 32 + 7))
    r = perplexity(model, ids, seqlen=32)
    assert r["windows"] == 5 and r["tokens"] == 5 * 31
    with torch.no_grad():
        losses = [model(ids[:, i * 32:(i + 1) * 32], labels=ids[:, i * 32:(i + 1) * 32]).loss.item() for i in range(5)]
    assert math.isclose(r["ppl"], math.exp(sum(losses) / 5), rel_tol=1e-5)
    assert perplexity(model, ids, seqlen=32, max_windows=2)["windows"] == 2
