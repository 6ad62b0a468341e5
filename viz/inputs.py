"""What ``cli explain`` feeds a head: one image and one caption through the backbones a checkpoint
was trained on (its recorded features), and the checkpoint's model built for them.

``model_from_checkpoint`` wants cache readers; a `heads.checkpoint.RecordedCache` stands in for
them with the attributes those backbones would write (``extract.runner.image_attrs`` /
``text_attrs``), so the checkpoint's own check compares them with the caches the run was trained
on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cache.batch import IdsBatch, InputBatch, PixelBatch, as_cached
from cache.errors import InputError
from extract.recorded import recorded_encoder
from extract.datasets import SplitIndex
from extract.runner import image_attrs, text_attrs
from heads.checkpoint import (RecordedCache, load_checkpoint, model_from_checkpoint,
                               note_centre_view)
from heads.sources import RetrievalModel
from viz.overlay import as_seen, open_image


@dataclass
class Pair:
    """An image and a caption ready for a checkpoint's model (in eval mode, on the CPU)."""

    model: RetrievalModel
    image: InputBatch              # [1, T, D] as a cache would hold them (fp16 values), or the
    text: InputBatch               # pixels / word-piece ids an e2e side reads
    words: list[str]               # the caption's tokens, [CLS] ... [SEP]
    seen: Image.Image              # the image as the backbone saw it (resized, no crop)
    caption: str
    checkpoint: str


def load_pair(checkpoint: str | Path, image_path: str | Path, caption: str,
              mode: str | None = None) -> Pair:
    """The model of ``checkpoint`` (branch ``mode``) and the tokens of ``image_path`` and
    ``caption`` from the backbones recorded in it; InputError for region features (no backbone to
    run), changed weights, an empty caption or an unreadable image."""
    if not caption.strip():
        raise InputError("--caption is empty")
    checkpoint = str(checkpoint)
    state = load_checkpoint(checkpoint)
    note_centre_view(state, "cli explain")
    image_features, text_features = state["features"]["image"], state["features"]["text"]
    if image_features.get("grid") is None:
        raise InputError(f"{checkpoint}: the image side of head {state['head_name']!r} reads "
                         f"{image_features['encoder']!r} tokens without a grid (region features?); "
                         "explain draws on a backbone's patch grid")
    image = open_image(image_path)
    image_encoder = recorded_encoder("image", image_features, checkpoint)
    text_encoder = recorded_encoder("text", text_features, checkpoint)

    image_path = Path(image_path)
    index = SplitIndex(dataset="explain", split="explain", image_ids=[image_path.name],
                       image_paths=[image_path.name], captions=[caption],
                       caption_image_index=np.zeros(1, np.int64), images_root=image_path.parent)
    image_cache = RecordedCache(image_attrs(image_encoder, index),
                                f"{image_path} ({image_encoder.name})")
    text_cache = RecordedCache(text_attrs(text_encoder, index), f"the caption ({text_encoder.name})")
    model = model_from_checkpoint(state, image_cache, text_cache)
    model.set_mode(mode).eval()

    ids = text_encoder.tokenize([caption])
    input_ids, attention = text_encoder.pad_batch(ids)
    pixels = image_encoder.transform(image).unsqueeze(0)
    image_input: InputBatch = PixelBatch(pixels)       # what an e2e side's tuned backbone reads
    text_input: InputBatch = IdsBatch(input_ids, attention.bool())
    with torch.no_grad():
        if model.image_source.reads == "tokens":
            tokens = image_encoder(pixels)
            image_input = as_cached(tokens)
        if model.text_source.reads == "tokens":
            text_input = as_cached(text_encoder(input_ids, attention), attention)
    return Pair(model=model, image=image_input, text=text_input,
                words=text_encoder.tokenizer.convert_ids_to_tokens(ids[0]),
                seen=as_seen(image, image_encoder.preprocessing), caption=caption,
                checkpoint=checkpoint)
