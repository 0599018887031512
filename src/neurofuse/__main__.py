"""``python -m neurofuse`` (also ``torchrun -m neurofuse``): the command-line interface."""

import sys

from .cli import main

sys.exit(main())
