"""``python -m speckv.train fit|validate|test|predict`` (see :mod:`speckv.train.cli`)."""

import logging
import sys

from speckv.train.cli import main

# speckv's own messages (which checkpoint a run resumes from, what it skipped) on stderr, as
# `python -m speckv` shows them; Lightning keeps its own handler
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                    stream=sys.stderr)
sys.exit(main())
