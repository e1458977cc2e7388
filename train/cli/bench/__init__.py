"""`make bench`: timed trainer steps beside a bare torch + peft baseline (see train.cli.bench.cli)."""
