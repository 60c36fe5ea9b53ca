"""The CPU fake-quant kernel for qatcore."""
