"""shardwise: distributed fine-tuning recipes around one shard-aware Adam-family optimizer."""

__version__ = "0.1.0"
