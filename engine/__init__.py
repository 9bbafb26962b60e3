"""The DuckDB engine: config, version store and Snapshots, queries, SQL rewrites, encoded
answers and answers files. Imported by the loader (`loaders`) and the HTTP side (`serving`);
imports neither, nor aiohttp."""
