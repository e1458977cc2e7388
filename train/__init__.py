"""The recipe, its run (config, step, checkpoints, tracking, export) and the command-line entry points."""
