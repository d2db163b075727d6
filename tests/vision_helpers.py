"""A tiny random-weight vision-language model made on the fly (no small vision model ships offline): an Idefics3
(SmolVLM's architecture) of a few layers over the starter's tokenizer, with a 32-pixel image processor, so an
image becomes 4 image tokens between its marker tokens. Its answers are noise; tests check the plumbing."""
from __future__ import annotations

import base64
import io
from pathlib import Path

#: Image tokens per image: (image_size / patch_size)^2 / scale_factor^2 = (32 / 8)^2 / 2^2.
IMAGE_SEQ_LEN = 4


def make_tiny_vlm(folder: Path, tokenizer_dir: Path) -> Path:
    """Write the model, its processor and the starter's chat template to `folder`; returns it."""
    import torch
    from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    images = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                       do_image_splitting=False)
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=IMAGE_SEQ_LEN,
                                  chat_template=tokenizer.chat_template)
    config = Idefics3Config(
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 1024, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        scale_factor=2, image_token_id=processor.image_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def png_data_url(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> str:
    """A one-colour PNG as a data URL, as a client sends an image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}
