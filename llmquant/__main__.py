"""``python -m llmquant ...``: the same CLI as the ``llmquant`` console script."""
from llmquant.cli import main

if __name__ == "__main__":
    main()
