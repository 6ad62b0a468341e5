"""The backbone library: how to build, run and rebuild an image or text backbone.

``registry`` (the encoders by name and their token layouts), ``encoders`` (what a wrapper is),
``timm_backbones``, ``weights`` (where weights come from), ``transforms`` (preprocessing),
``recorded`` (a backbone built again from what a cache recorded) and ``tails`` (what runs after a
cached layer). `extract` runs these over a dataset; `heads.sources`, `search` and `viz` rebuild them.
"""
