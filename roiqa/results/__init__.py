"""What a query run writes: its tables and summary, report.html and heatmap overlays."""
