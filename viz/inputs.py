"""What ``cli explain`` feeds a head: one image and one caption through the backbones a checkpoint
was trained on (its recorded features), and the checkpoint's model built for them.

``heads.model.create_model`` wants caches; `heads.model.recorded_cache` stands in for them with
the attributes the run's backbones wrote, and each side's token source makes its input of the
photo and the caption (``encode_raw``: the recorded backbone's tokens, or the photo / word pieces
a tuned backbone reads)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from backbones.recorded import recorded_encoder
from cache.batch import IdsBatch, InputBatch, PixelBatch
from cache.errors import InputError
from extract.datasets import load_rgb
from heads.checkpoint import load_checkpoint, note_centre_view
from heads.model import RetrievalModel, create_model, recorded_cache
from viz.overlay import as_seen


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
    image = load_rgb(image_path)            # the decoder of cli extract and cli index
    image_encoder = recorded_encoder("image", image_features, checkpoint)
    text_encoder = recorded_encoder("text", text_features, checkpoint)

    image_path = Path(image_path)
    image_cache = recorded_cache(state, "image", f"{image_path} ({image_encoder.name})")
    text_cache = recorded_cache(state, "text", f"the caption ({text_encoder.name})")
    model = create_model(state, image_cache, text_cache)
    model.set_mode(mode).eval()

    ids = text_encoder.tokenize([caption])
    input_ids, attention = text_encoder.pad_batch(ids)
    pixels = image_encoder.transform(image).unsqueeze(0)
    image_input = model.image_source.encode_raw(PixelBatch(pixels), image_encoder)
    text_input = model.text_source.encode_raw(IdsBatch(input_ids, attention.bool()), text_encoder)
    return Pair(model=model, image=image_input, text=text_input,
                words=text_encoder.tokenizer.convert_ids_to_tokens(ids[0]),
                seen=as_seen(image, image_encoder.preprocessing), caption=caption,
                checkpoint=checkpoint)
