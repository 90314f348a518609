"""The CaptionJob stage: BLIP-2 captions for the catalog, one work unit per group of input shards."""
