"""llmquant: GPTQ and the quantization toolbox around it."""
__version__ = "0.1.0"
def load(*a, **k): from llmquant.runtime.loader import load as _l; return _l(*a, **k)  # noqa: E302,E704
