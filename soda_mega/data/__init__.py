"""Data: codec, tokenizers, document builders, MDS shards and the streaming mixture loader."""
