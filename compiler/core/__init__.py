"""The core: IR helpers, the pass base, pipeline and instruments, registry, recipe, plan,
quantized-weight records, calibration, artifact, errors. Imports nothing of lowbit above it."""
