"""Run stage-one commands in-process the way ``cli.py`` runs them, and build tiny test inputs.

``run_cli(...)`` returns ``(exit code, output)``: an ``InputError`` becomes exit 2 with its message,
as ``cli.main`` does; ``CLI_PY`` is the command line of a real ``python cli.py`` subprocess.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from cache.errors import InputError
from cli import cli as GROUP

REPO_ROOT = Path(__file__).resolve().parents[2]

CLI_PY = [sys.executable, str(REPO_ROOT / "cli.py")]


def run_cli(*args: object) -> tuple[int, str]:
    """Invoke ``cli <args>``; returns (exit code, stdout+stderr or the error message)."""
    result = CliRunner().invoke(GROUP, [str(a) for a in args], standalone_mode=False)
    if isinstance(result.exception, InputError):
        message = str(result.exception)
        assert "\n" not in message, f"error message is not one line: {message!r}"
        return 2, message
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code or 0, result.output


def save_tiny_models(root: Path, words: list[str]) -> dict[str, Path]:
    """A tiny random DINOv2 (patch 8, hidden 16; two seeds) and a tiny BERT whose vocabulary holds
    ``words``, saved with ``save_pretrained`` like a downloaded hub snapshot."""
    from transformers import (BertConfig, BertModel, BertTokenizer, Dinov2Config, Dinov2Model)

    vit = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               image_size=32, patch_size=8)
    folders = {}
    for name, seed in (("dinov2", 0), ("dinov2_other", 1)):
        torch.manual_seed(seed)
        Dinov2Model(Dinov2Config(**vit)).save_pretrained(root / name)
        folders[name] = root / name
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words))
    torch.manual_seed(2)
    bert = BertModel(BertConfig(vocab_size=len(vocab), max_position_embeddings=128, hidden_size=16,
                                num_hidden_layers=2, num_attention_heads=2, intermediate_size=32),
                     add_pooling_layer=False)
    bert.save_pretrained(root / "bert")
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(root / "vocab.txt")).save_pretrained(root / "bert")
    folders["bert"] = root / "bert"
    return folders
