"""Quantize and convert models (see modules.quantize.gguf and the command line in __main__)."""
