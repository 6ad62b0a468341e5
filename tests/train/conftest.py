"""Fixtures of the training app's tests."""
from tests.heads.eval.conftest import split  # noqa: F401  (a 12-image, 36-caption test split)
