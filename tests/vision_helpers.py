"""A tiny random-weight vision-language model made on the fly (no small vision model ships offline): an Idefics3
(SmolVLM's architecture) of a few layers over the starter's tokenizer, with a 32-pixel image processor, so an
image becomes 4 image tokens between its marker tokens. Its answers are noise; tests check the plumbing.
make_tiny_vlm_gguf converts it with llama.cpp's own converter into the text GGUF and its mmproj GGUF."""
from __future__ import annotations

import base64
import io
from pathlib import Path

#: Image tokens per image: (image_size / patch_size)^2 / scale_factor^2 = (32 / 8)^2 / 2^2.
IMAGE_SEQ_LEN = 4
SMOLVLM_ROW_COL_TOKENS = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]


def make_tiny_vlm(folder: Path, tokenizer_dir: Path) -> Path:
    """Write the model, its processor and the starter's chat template to `folder`; returns it."""
    import torch
    from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # SmolVLM's tokenizer has these as single tokens; llama.cpp's mtmd looks "<global-img>" up as one token (an
    # absent one becomes token -1 in the prompt, which llama_decode refuses).
    tokenizer.add_special_tokens({"additional_special_tokens": ["<global-img>", *SMOLVLM_ROW_COL_TOKENS]})
    images = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                       do_image_splitting=False)
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=IMAGE_SEQ_LEN,
                                  chat_template=tokenizer.chat_template)
    config = Idefics3Config(
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 1024, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                     "architectures": ["VLlama3ForCausalLM"]},  # as SmolVLM's: what llama.cpp's converter reads
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


def make_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    """A one-colour PNG file at `path`, as a user picks one."""
    from PIL import Image

    Image.new("RGB", size, color).save(path, "PNG")
    return path


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def make_tiny_vlm_gguf(vlm_dir: Path, folder: Path) -> tuple[Path, Path]:
    """The text GGUF and the mmproj GGUF of the model in `vlm_dir`, written to `folder` by llama.cpp's own
    converter (as the Model tab's convert runs it); returns (model, mmproj)."""
    from modules.quantize.llama_tools import run_converter

    folder.mkdir(parents=True, exist_ok=True)
    model, mmproj = folder / "tiny-vlm.F16.gguf", folder / "mmproj-tiny-vlm.F16.gguf"
    run_converter("convert_hf_to_gguf.py", [str(vlm_dir), "--outtype", "f16", "--outfile", str(model)])
    run_converter("convert_hf_to_gguf.py", [str(vlm_dir), "--mmproj", "--outtype", "f16", "--outfile", str(mmproj)])
    return model, mmproj


def image_chat(first: str, second: str) -> list[dict]:
    """Two turns, each user message with an image (data URLs `first`, `second`) before its text."""
    return [{"role": "user", "content": [image_part(first), {"type": "text", "text": "Look at this."}]},
            {"role": "assistant", "content": "A square of one colour."},
            {"role": "user", "content": [image_part(second), {"type": "text", "text": "And this one?"}]}]


def check_images_counted_and_fitted(services, model: str, first: str, second: str) -> None:
    """On the loaded vision model `model`: the chat path counts a prompt with images as the model reads it (each
    image as its tokens, the count generation reports), and fitting a chat to a context one token short of it
    leaves out the oldest turn, image and all, for a prompt that then fits."""
    from modules.chat.request import ChatRequest, prepare_chat

    def fitted(truncation_length: int):
        chat = services.settings.chat.model_copy(update={"truncation_length": truncation_length})
        params = services.default_params(model).model_copy(update={"max_new_tokens": 4})
        prepared = prepare_chat(services, ChatRequest(messages=image_chat(first, second), chat=chat, params=params,
                                                      model=model))
        read = services.manager.prompt_token_count(prepared.model_prompt, prepared.params, add_bos=prepared.add_bos,
                                                   model=model)
        return prepared, read

    whole, read = fitted(0)
    loaded = services.manager.require_model(model)
    assert len(whole.images) == 2 and whole.dropped_messages == 0
    assert whole.prompt_tokens == read  # the images' tokens counted, not their markers'
    assert read - loaded.token_count(whole.prompt) >= 2 * (IMAGE_SEQ_LEN - 1)
    budget = read - 1  # one token short of the whole chat (the context is the budget and max_new_tokens)
    tight, tight_read = fitted(budget + 4)
    assert tight.dropped_messages == 2 and len(tight.images) == 1
    assert tight.prompt_tokens == tight_read <= budget
