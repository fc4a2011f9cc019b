"""``llmquant`` command line: parses flags, calls the library, renders results."""
from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llmquant.cli_app import app  # noqa: E402

# Each module registers its commands on ``app``.
from llmquant import cli_quantize  # noqa: E402,F401  gptq, rtn            (issue 2)
from llmquant import cli_runtime   # noqa: E402,F401  eval, generate, inspect (issue 3)
from llmquant import cli_foundations  # noqa: E402,F401  dtypes, ptq-*, qat  (issue 4)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
