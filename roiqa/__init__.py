"""roiqa: query-patch instance retrieval with heatmaps and boxes (library; never imports Ray)."""

__version__ = "0.1.0"
