"""Models of roiqa: the ResNet + FPN backbone and the seed-003 matcher."""
