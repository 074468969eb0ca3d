"""Scaling laws: SODA's IsoFLOP grid, sweeps through the training CLI, fits and plots.

* :mod:`.budget`: FLOP budget -> training tokens (exact full-attention count, or 6ND).
* :mod:`.grid`: the grid rule (width -> layers, heads, FFN, batch, lr, betas) and its filters.
* :mod:`.manifest`: the manifest ``scaling grid`` writes and ``scaling sweep`` reads.
* :mod:`.sweep`: launch the runs (local, torchrun, SLURM array), record held-out NLL.
* :mod:`.results`: read and check a results CSV.
* :mod:`.isoflop`: Chinchilla approach 2 (parabolas per budget, power laws, bootstrap).
* :mod:`.parametric`: Chinchilla approach 3 (``L = E + A/N^alpha + B/D^beta``, Huber).
* :mod:`.fit`: both methods, predictions for a chosen budget, the report.
* :mod:`.plots`: IsoFLOP curves, frontiers and loss contours (PNG).
"""
