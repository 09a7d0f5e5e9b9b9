"""Ray wiring of roiqa: Ray Data chains for indexing and querying (no math lives here)."""
