"""Process groups, Megatron-core CPU/gloo support and full<->sharded weight mapping."""
