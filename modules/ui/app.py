"""Builds the Gradio app from the services and launches it. (Placeholder until the web UI lands.)"""
from __future__ import annotations

import gradio as gr

from modules.services import Services


def build_app(services: Services) -> gr.Blocks:
    info = services.manager.info()
    with gr.Blocks(title="LLM workbench") as app:
        gr.Markdown(f"# LLM workbench\nReady. Loaded model: **{info.name if info else 'none'}**")
    return app


def launch(services: Services) -> int:
    settings = services.settings
    app = build_app(services)
    print(f"Ready: http://{settings.host}:{settings.listen_port}", flush=True)
    app.queue().launch(server_name=settings.host, server_port=settings.listen_port, share=settings.share,
                       prevent_thread_lock=False)
    return 0
