"""The ScrapeJob stage: plan (metadata -> per-split work units) and fetch (unit -> MDS shards)."""
