"""Pure tensor ops of the matcher: GeM pooling, dense cosine cross-correlation, LSE fusion, peaks."""
