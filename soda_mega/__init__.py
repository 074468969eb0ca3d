"""soda-mega: a Megatron-core training stack for SODA-style audio-text foundation models."""

__version__ = "0.1.0"

from soda_mega.parallel import megatron_import as _megatron_import

_megatron_import.install()
