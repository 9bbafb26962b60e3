"""duckswap HTTP serving layer."""
