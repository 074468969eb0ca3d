"""Sub-commands of the ``soda-mega`` CLI (see :mod:`soda_mega.cli`)."""
