"""Export a checkpoint's trained weights in the formats the ecosystem loads, with a model card in each folder.

    python -m train.cli.export --checkpoint runs/x/checkpoint-200 [--out DIR] [--kohya] [--merge]

--help shows the export folder's layout (train/adapter_export.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cycletune.train import adapter_export
from cycletune.train.adapter_export import export_run, load_checkpoint_models
from cycletune.train.checkpoint import CheckpointError
from cycletune.train.cli.help_format import HelpFormatter
from cycletune.train.cli.sampling_arguments import add_output_argument
from cycletune.train.run_dir import EXPORT_FOLDER


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=adapter_export.__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint-N folder of a run")
    add_output_argument(parser, required=False, help="export folder (default: <checkpoint>/export)")
    parser.add_argument("--kohya", action="store_true", help="also write the UNet LoRA in kohya format")
    parser.add_argument("--merge", action="store_true", help="also write standalone models with LoRA merged")
    args = parser.parse_args(argv)
    try:
        captioner, generator, config = load_checkpoint_models(args.checkpoint)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    step = int(args.checkpoint.name.rsplit("-", 1)[-1]) if "-" in args.checkpoint.name else 0
    out = export_run(
        captioner,
        generator,
        config,
        args.out or args.checkpoint / EXPORT_FOLDER,
        step=step,
        command=["python -m train.cli.export", *(argv if argv is not None else sys.argv[1:])],
        kohya=args.kohya,
        merge=args.merge,
    )
    print(f"exported to {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
