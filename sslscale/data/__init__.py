"""Data: shard writing and manifests (shards.py), raw sources (sources.py), readers (stream.py)."""
