"""Building datasets: inputs -> codec -> documents -> MDS shards (one side of the format)."""
