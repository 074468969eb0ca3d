"""What one run's configuration comes to once the world size is known (``resolved.py``).

The floor above ``config`` and ``tokens`` and below ``parallel``, ``model`` and ``data``,
which receive the resolved run instead of deriving its pieces again."""
