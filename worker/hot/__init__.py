"""The hot tier: Redis keys, scanning, leases and compare-and-swap rewrites."""
