"""``python -m speckv.train fit|validate|test|predict`` (see :mod:`speckv.train.cli`)."""

import sys

from speckv.train.cli import main

sys.exit(main())
