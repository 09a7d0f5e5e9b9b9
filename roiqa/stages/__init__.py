"""Per-batch stages the pipelines put on Ray: decode and embed, complexity, masks, rerank, refine, verify."""
