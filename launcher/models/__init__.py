"""Models: building the task model, quantization, adapters."""
