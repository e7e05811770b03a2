"""``python -m datamodules.docmatix``."""

import sys

from datamodules.docmatix.cli import main

sys.exit(main())
