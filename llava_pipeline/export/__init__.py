"""Quantization (torchao), torch.export and XNNPACK lowering, .pte serialization, and the model files
that cross stage boundaries."""
