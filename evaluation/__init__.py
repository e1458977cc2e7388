"""Caption, image and text metrics, reconstruction reranking, and the demo's test split and report."""
