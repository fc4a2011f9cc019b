"""llmquant: GPTQ and the quantization toolbox around it."""
__version__ = "0.1.0"
