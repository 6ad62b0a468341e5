"""Search your own photos: index a folder with a trained run, query it by text or by photo.

``search.open_index(path)`` opens an index folder written by ``cli index`` (`search.query.Index`).
"""
from search.query import Index, open_index

__all__ = ["Index", "open_index"]
