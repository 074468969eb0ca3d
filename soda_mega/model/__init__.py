"""The SODA decoder on Megatron-core: spec, attention, norm, builder and accounting."""
