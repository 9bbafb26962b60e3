"""duckswap update path: sources, loading, snapshots and swaps. Never imports aiohttp."""
