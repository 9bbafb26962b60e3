"""The duckswap load benchmark: open loop, during swaps, with a CI gate."""
