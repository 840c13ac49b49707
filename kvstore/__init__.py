"""The tiered KV-cache store: radix index + tiers + placement policies."""

__version__ = "0.1.0"
