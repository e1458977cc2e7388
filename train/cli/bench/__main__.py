"""`python -m train.cli.bench`."""

import sys

from cycletune.train.cli.bench.cli import main

sys.exit(main())
