"""The published index: versions and CURRENT, the writers' lock, the faiss coarse index, region hubness."""
