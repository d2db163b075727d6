"""The workbench core: settings, generation parameters, presets, chat prompts, the model manager.

Nothing in this package imports Gradio; the UI layer (modules/ui) is the only place that does.
"""

import logging as _logging

# PEFT imports torchao (a GPTQModel dependency) whenever it is imported. torchao's wheel carries optional CUDA
# kernels (MX-FP8, CUTLASS for Hopper) built for another Python, which it reports as "Failed to load ..." warnings,
# and registers enums with torch's pytree, which torch 2.13 reports as deprecated: noise on every entry point's
# stderr that says nothing about the user's model or input. Errors from both still show.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
