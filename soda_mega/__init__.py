"""soda-mega: a Megatron-core training stack for SODA-style audio-text foundation models."""

__version__ = "0.1.0"
