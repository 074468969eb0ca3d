"""matplotlib for result plots: the headless Agg backend, or None when it is not installed."""

from __future__ import annotations

NOT_INSTALLED = "matplotlib not installed: no plot written"


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (PNG files, no display), or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
