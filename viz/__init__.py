"""Pictures: training curves and recall bars of runs (``cli plot``), and what a head used in an
image for a caption (``cli explain``). matplotlib with the Agg backend; PNGs written atomically."""
