"""A request's own random numbers, so that what it draws does not depend on what else runs.

transformers.set_seed seeds torch's global generators; a batch of requests, or two models served from two threads,
would then share one stream and each request's draws would depend on the others. SeededDraws holds one generator
per device, each seeded with the request's seed: a fresh torch.Generator seeded with s yields exactly what the
global generator yields after torch.manual_seed(s), so a seeded request draws the same numbers alone, in a batch,
or through generate() with set_seed.
"""
from __future__ import annotations

import torch


class SeededDraws:
    """Generators for one request, made on first use per device (the CPU for XTC's coin, the logits' device for
    the token draw and mirostat)."""

    def __init__(self, seed: int):
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def on(self, device: torch.device | str) -> torch.Generator:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(self.seed)
            self._generators[device] = generator
        return generator


def generator_on(draws: SeededDraws | None, device: torch.device | str) -> torch.Generator | None:
    """The request's generator on `device`, or None (torch's global one) for a request without its own."""
    return draws.on(device) if draws is not None else None
