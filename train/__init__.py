"""The training app: ``cli train-head``, ``eval``, ``export-backbone`` and ``check-fit``.

``config`` (YAML run configs), ``trainer`` (epochs, dev selection, resume), ``distributed``
(torchrun), ``warm_start``, ``evaluate`` (a whole split), ``export`` (a tuned backbone as
weights), ``fit_check`` and the click commands. It uses the `heads` library; nothing imports it
but `cli.py`, benchmarks and scripts.
"""
