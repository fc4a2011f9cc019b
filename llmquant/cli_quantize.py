"""Commands registered on llmquant.cli_app.app."""
from llmquant.cli_app import app  # noqa: F401
