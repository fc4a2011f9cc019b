"""Post-training W8A8 quantization (dynamic and static) and its checkpoint format."""
from llmquant.ptq.checkpoint import apply_w8a8, save_w8a8
from llmquant.ptq.linear import W8A8Linear, int8_matmul, int_mm_available
from llmquant.ptq.quantize import PTQConfig, calibrate, quantize_w8a8, target_linears

__all__ = ["PTQConfig", "W8A8Linear", "apply_w8a8", "calibrate", "int8_matmul", "int_mm_available",
           "quantize_w8a8", "save_w8a8", "target_linears"]
