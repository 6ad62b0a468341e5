"""Everything between an encoded split and a table of recalls.

``scoring`` (encode every item once, fill similarity matrices block by block, in fp32),
``metrics`` (ranks, R@K, protocols) and ``rerank`` (shortlist + re-rank of one gallery); a whole
split, full scoring or two-stage, is `train.evaluate`.
"""
