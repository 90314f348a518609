"""EvalRun: FID, KID, CLIP-FID and CLIP score of a pipeline, its generation sharded over workers."""
