"""CycleTune: the caption, image and text metrics users report, each skipped with a reason when its weights are absent."""
