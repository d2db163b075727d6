"""The Gradio layer: one file per tab, each drawing its widgets from the core's types and holding no logic."""
