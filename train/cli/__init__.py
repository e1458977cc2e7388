"""Command-line entry points: generate, evaluate, rerank, export, demo, retrain_base, drill, bench."""
