"""ALADIN: a word-region alignment teacher distilled into a global-embedding student (CBMI 2022).

* **Teacher** (alignment, interaction): per side ``Linear(D -> embed_dim)`` and ``teacher_layers``
  transformer layers with key-padding masks, L2-normalised tokens, score = MrSw (max over regions,
  sum over words) after dropping the special tokens (``drop_tokens``).
* **Student** (matching, embedding): per-side input projections to ``embed_dim`` and one small
  transformer shared by both modalities (``student_layers`` = 2, 4 heads, ff = ``embed_dim`` as in
  the reference), key-padding masks; its output at position 0 (``global_pool``), L2-normalised, is
  the global embedding; similarity = cosine.

Training stages (``stage``):

* ``teacher``: the alignment hinge (the configured criterion) on the in-batch MrSw matrix only;
* ``student``: the teacher comes from ``teacher_checkpoint`` (a finished ``teacher`` or ``joint``
  run of this head) and is frozen (no gradient, eval mode). The head only names that file
  (``pretrained_parts``); the trainer copies the run's ``teacher.*`` weights in, and nothing else
  of it. A student run's own checkpoint holds the teacher too, so rebuilding it (``cli eval``,
  resume) does not need that file; a teacher never loaded is an error at the first encoding or
  training step. Loss =
  ``distill_weight * ListNet(teacher, student)`` (both directions, student scores times
  ``student_scale``) ``+ matching_weight * hinge(student)``;
* ``joint``: ``alignment_weight * hinge(teacher) + matching_weight * hinge(student) +
  distill_weight * ListNet`` with the teacher scores detached inside the distillation term.

In ``student`` and ``joint`` the distillation term is absent for the first ``distill_after_steps``
optimisation steps.

Inference branches: ``"student"`` (embedding) and ``"teacher"`` (interaction, raw MrSw); every
encoding carries both, so a two-stage search is student shortlist + teacher re-rank. The default
branch (mode ``None``) is the teacher for ``stage="teacher"`` and the student otherwise, so
checkpoint selection on dev measures what the stage trains.

Deviations from the released code (mesnico/ALADIN), all deliberate:

* the reference teacher has no parameters because VinVL itself is fine-tuned; from a frozen cache
  it gets trainable projections and ``teacher_layers`` transformer layers per side (TERAN-like), so
  it can be trained at all;
* the student reads the cache through its own per-side projections (``student_input="cache"``, so
  it needs none of the teacher at inference); ``student_input="teacher"`` feeds it the teacher's
  output tokens instead, the reference topology (there both heads sit on the same VinVL outputs);
* ``distill_after_steps`` is honoured (the reference reads a misspelt key and always distils from
  step 0); the frozen teacher runs in eval mode (the reference keeps dropout on);
* the image global token is the cache's CLS token when there is one, else the first region/patch as
  in the reference (``global_pool="first"``); ``"mean"`` pools instead. The reference's ``[UNK]``
  image start token has no counterpart here (the cache holds no tag sequence);
* MrSw masks padding with -inf (no hidden ReLU) and by default drops only the cache's prefix
  ([CLS], image CLS) and suffix ([SEP]) tokens; ``drop_tokens="teran"`` also drops each caption's
  last word piece as the reference does. The reference also drops the first region of every image
  (there is no image CLS there); that quirk is not reproduced;
* the criterion (margin, hardest negatives) comes from the config's ``loss`` section and serves
  both ranking terms;
* for a mean-reduced criterion such as InfoNCE: ``word_pool="mean"`` averages the teacher's
  per-word maxima instead of summing them (TERAN's MrAVGw, a score in [-1, 1] like the student's
  cosine), and ``teacher_scale`` multiplies the teacher's scores inside the distillation (the
  reference's MrSw sums are sharp on their own, scale 1; averaged scores need about the inverse
  of the contrastive temperature).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from cache.batch import TokenBatch
from cache.errors import InputError
from heads.registry import register_head
from heads.base import Criterion, Encoded, FeatureSpec, Head, Progress
from heads.layers import WORD_POOLS, l2norm, mrsw, mrsw_block
from heads.losses import listnet_distillation
from heads.layers.token_sets import (TokenTransformer, alignment_set, check_drop_rule,
                              resolve_global_pool)

STUDENT_INPUTS = ("cache", "teacher")


class _Teacher(nn.Module):
    """Per-side projection + transformer; MrSw over the L2-normalised outputs."""

    def __init__(self, image_spec: FeatureSpec, text_spec: FeatureSpec, embed_dim: int,
                 layers: int, heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.image_proj = nn.Linear(image_spec.dim, embed_dim)
        self.text_proj = nn.Linear(text_spec.dim, embed_dim)
        self.image_layers = TokenTransformer(embed_dim, layers, heads, ff_dim, dropout)
        self.text_layers = TokenTransformer(embed_dim, layers, heads, ff_dim, dropout)

    def tokens(self, batch: TokenBatch, is_text: bool) -> Tensor:
        """Output tokens ``[B, T, E]`` (before normalisation; zero at padding)."""
        proj, layers = ((self.text_proj, self.text_layers) if is_text
                        else (self.image_proj, self.image_layers))
        return layers(proj(batch.tokens.to(proj.weight.dtype)), batch.mask)


class _Student(nn.Module):
    """Per-side input projections, one transformer shared by both modalities, pooled + L2."""

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int, layers: int, heads: int,
                 ff_dim: int, dropout: float, image_pool: Callable[[Tensor, Tensor], Tensor],
                 text_pool: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.image_proj = nn.Linear(image_dim, embed_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.encoder = TokenTransformer(embed_dim, layers, heads, ff_dim, dropout)
        self.image_pool, self.text_pool = image_pool, text_pool

    def forward(self, tokens: Tensor, mask: Tensor, is_text: bool) -> Tensor:
        """``tokens [B, T, D_side]`` -> L2-normalised global ``[B, E]``."""
        proj, pool = ((self.text_proj, self.text_pool) if is_text
                      else (self.image_proj, self.image_pool))
        out = self.encoder(proj(tokens.to(proj.weight.dtype)), mask)
        return l2norm(pool(out, mask))


# Which loss terms each stage trains: (alignment hinge, matching hinge, distillation).
STAGES: dict[str, tuple[bool, bool, bool]] = {
    "teacher": (True, False, False),
    "student": (False, True, True),
    "joint": (True, True, True),
}


@register_head("aladin")
class ALADINHead(Head):
    """Alignment teacher + distilled matching student; see the module docstring."""

    kind = "embedding"
    modes = {"student": "embedding", "teacher": "interaction"}

    def __init__(self, image_spec: FeatureSpec, text_spec: FeatureSpec, stage: str = "joint",
                 embed_dim: int = 768, teacher_layers: int = 2, teacher_ff_dim: int = 1536,
                 student_layers: int = 2, student_ff_dim: int = 768, heads: int = 4,
                 dropout: float = 0.1, drop_tokens: str = "cls_sep", global_pool: str = "first",
                 student_input: str = "cache", teacher_checkpoint: str | None = None,
                 alignment_weight: float = 1.0, matching_weight: float = 0.1,
                 distill_weight: float = 1.0, student_scale: float = 6.0,
                 teacher_scale: float = 1.0, distill_after_steps: int = 0,
                 word_pool: str = "sum") -> None:
        super().__init__(image_spec, text_spec)
        if stage not in STAGES:
            raise InputError(f"aladin: stage must be one of {sorted(STAGES)}, got {stage!r}")
        if student_input not in STUDENT_INPUTS:
            raise InputError(f"aladin: student_input must be one of {STUDENT_INPUTS}, "
                             f"got {student_input!r}")
        if distill_after_steps < 0:
            raise InputError(f"aladin: distill_after_steps must be >= 0, got {distill_after_steps}")
        check_drop_rule(drop_tokens)
        if word_pool not in WORD_POOLS:
            raise InputError(f"aladin: word_pool must be one of {WORD_POOLS}, got {word_pool!r}")
        self.word_pool, self.teacher_scale = word_pool, teacher_scale
        self.stage, self.drop_tokens, self.student_input = stage, drop_tokens, student_input
        self.alignment_weight, self.matching_weight = alignment_weight, matching_weight
        self.distill_weight, self.student_scale = distill_weight, student_scale
        self.distill_after_steps = distill_after_steps
        self.default_mode = "teacher" if stage == "teacher" else "student"
        if not self.active_terms(Progress(step=distill_after_steps)):
            raise InputError(f"aladin: stage {stage!r} trains nothing with these weights "
                             f"(alignment_weight={alignment_weight}, matching_weight="
                             f"{matching_weight}, distill_weight={distill_weight})")
        if not self.active_terms(Progress(step=0)):
            raise InputError(f"aladin: stage {stage!r} trains nothing during the first "
                             f"{distill_after_steps} steps (distill_after_steps) with "
                             f"matching_weight={matching_weight}")

        self.teacher = _Teacher(image_spec, text_spec, embed_dim, teacher_layers, heads,
                                teacher_ff_dim, dropout)
        from_teacher = student_input == "teacher"
        self.student = _Student(
            embed_dim if from_teacher else image_spec.dim,
            embed_dim if from_teacher else text_spec.dim, embed_dim, student_layers, heads,
            student_ff_dim, dropout, resolve_global_pool(global_pool, image_spec.prefix_tokens),
            resolve_global_pool(global_pool, text_spec.prefix_tokens))

        self.teacher_checkpoint = teacher_checkpoint
        self._teacher_ready = stage != "student"
        if stage == "student":
            if not teacher_checkpoint:
                raise InputError("aladin: stage 'student' distils a trained teacher; set "
                                 "head.teacher_checkpoint to a teacher run's checkpoint "
                                 "(e.g. runs/<teacher>/best.pt)")
            # The trainer copies the teacher in (pretrained_parts); a student run's own checkpoint
            # carries it too, so rebuilding that run (evaluation, resume) needs no teacher file.
            self.teacher.requires_grad_(False)
            self.teacher.eval()
            self.register_load_state_dict_post_hook(_teacher_loaded)

    # ------------------------------------------------------------------------ teacher loading

    def pretrained_parts(self) -> dict[str, str]:
        """Stage ``student``: the ``teacher`` comes from ``teacher_checkpoint``."""
        return {"teacher": self.teacher_checkpoint} if self.stage == "student" else {}

    def part_loaded(self, name: str) -> None:
        if name == "teacher":
            self._teacher_ready = True

    def frozen_prefixes(self) -> tuple[str, ...]:
        """Stage ``student`` trains the student only (the teacher is frozen); stage ``teacher``
        trains the teacher only (the student is unused until a student run copies the teacher)."""
        return {"student": ("teacher.",), "teacher": ("student.",)}.get(self.stage, ())

    def trained_branches(self) -> list[str | None]:
        """Stage ``teacher`` fits the teacher, ``student`` the student (its teacher comes trained
        from another run), ``joint`` both."""
        return {"teacher": ["teacher"], "student": ["student"]}.get(self.stage, list(self.modes))

    def _require_teacher(self) -> None:
        if not self._teacher_ready:
            raise InputError(f"aladin: the teacher of stage 'student' was never loaded from "
                             f"{self.teacher_checkpoint} (head.teacher_checkpoint); train with "
                             "cli train-head, or load it with "
                             "heads.checkpoint.load_pretrained_parts")

    def train(self, mode: bool = True) -> "ALADINHead":
        """As ``nn.Module.train``; a frozen teacher (stage ``student``) stays in eval mode."""
        super().train(mode)
        if self.stage == "student":
            self.teacher.eval()
        return self

    # ------------------------------------------------------------------------------ encoding

    @property
    def score_kind(self) -> str:
        return self.modes[self.mode or self.default_mode]

    def _encode(self, batch: TokenBatch, spec: FeatureSpec, is_text: bool) -> Encoded:
        self._require_teacher()
        raw = self.teacher.tokens(batch, is_text)
        student_in = raw if self.student_input == "teacher" else batch.tokens
        tokens, mask = alignment_set(raw, batch.mask, spec, self.drop_tokens, is_text)
        emb = self.student(student_in, batch.mask, is_text)
        return {"emb": emb, "tokens": tokens, "mask": mask}

    def encode_images(self, batch: TokenBatch) -> Encoded:
        """Student ``emb [B, E]`` and the teacher's region tokens ``tokens [B, R, E]``/``mask``."""
        return self._encode(batch, self.image_spec, is_text=False)

    def encode_texts(self, batch: TokenBatch) -> Encoded:
        """Student ``emb [B, E]`` and the teacher's word tokens ``tokens [B, W, E]``/``mask``."""
        return self._encode(batch, self.text_spec, is_text=True)

    # ------------------------------------------------------------------------------- scoring

    def score(self, images: Encoded, texts: Encoded) -> Tensor:
        if (self.mode or self.default_mode) == "student":
            return images["emb"] @ texts["emb"].transpose(0, 1)
        return mrsw_block(images["tokens"], images["mask"], texts["tokens"], texts["mask"],
                          self.word_pool)

    def score_pairs(self, images: Encoded, texts: Encoded) -> Tensor:
        if (self.mode or self.default_mode) == "student":
            return (images["emb"] * texts["emb"]).sum(dim=-1)
        return mrsw(images["tokens"], images["mask"], texts["tokens"], texts["mask"],
                    self.word_pool)

    # ------------------------------------------------------------------------------ training

    def active_terms(self, progress: Progress) -> tuple[str, ...]:
        """The loss terms trained at ``progress``: those of the stage with a non-zero weight, the
        distillation only from step ``distill_after_steps`` on."""
        align, match, distill = STAGES[self.stage]
        return tuple(name for name, on in (
            ("alignment", align and self.alignment_weight != 0),
            ("matching", match and self.matching_weight != 0),
            ("distillation", distill and self.distill_weight != 0
             and progress.step >= self.distill_after_steps)) if on)

    def training_loss(self, images: TokenBatch, texts: TokenBatch, image_ids: Tensor,
                      criterion: Criterion, progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        """The stage's loss terms (see the module docstring); logged terms are detached tensors."""
        self._require_teacher()
        active = self.active_terms(progress)
        need_teacher_scores = "alignment" in active or "distillation" in active
        from_teacher = self.student_input == "teacher"
        if need_teacher_scores or from_teacher:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.stage != "student"):
                img_raw = self.teacher.tokens(images, is_text=False)
                txt_raw = self.teacher.tokens(texts, is_text=True)
        terms: dict[str, Tensor] = {}
        if need_teacher_scores:
            img_set = alignment_set(img_raw, images.mask, self.image_spec, self.drop_tokens, False)
            txt_set = alignment_set(txt_raw, texts.mask, self.text_spec, self.drop_tokens, True)
            teacher_scores = mrsw_block(*img_set, *txt_set, self.word_pool)
            if "alignment" in active:
                terms["alignment"] = self.alignment_weight * criterion(teacher_scores, image_ids,
                                                                       progress)
        if "matching" in active or "distillation" in active:
            img_emb = self.student(img_raw if from_teacher else images.tokens, images.mask, False)
            txt_emb = self.student(txt_raw if from_teacher else texts.tokens, texts.mask, True)
            student_scores = img_emb @ txt_emb.transpose(0, 1)
            if "matching" in active:
                terms["matching"] = self.matching_weight * criterion(student_scores, image_ids,
                                                                     progress)
            if "distillation" in active:
                terms["distillation"] = self.distill_weight * listnet_distillation(
                    self.teacher_scale * teacher_scores, student_scores, self.student_scale)
        loss = sum(terms.values())
        return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}


def _teacher_loaded(head: ALADINHead, incompatible: Any) -> None:
    """``load_state_dict`` post-hook of a student-stage head: the teacher came with the state."""
    if not any(k.startswith("teacher.") for k in incompatible.missing_keys):
        head._teacher_ready = True
