"""The workbench core: settings, generation parameters, presets, chat prompts, the model manager.

Nothing in this package imports Gradio; the UI layer (modules/ui) is the only place that does.
"""
