"""`python -m train.cli.bench`."""

import sys

from train.cli.bench.cli import main

sys.exit(main())
