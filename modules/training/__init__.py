"""LoRA training: datasets -> a training job in a child process -> progress lines -> an adapter in loras/.

Modules: config (the typed job configuration), datasets (records -> formatted, tokenized, masked examples),
trainer (the Transformers Trainer pieces), run (the child process entry point), jobs (start/stop/resume from the
UI), progress (the JSON-lines progress file), export (merge, GGUF), perplexity (evaluation for both loaders).
"""
