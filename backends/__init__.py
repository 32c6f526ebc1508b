"""Backends: lower the quantized IR to what a runtime executes fastest."""
