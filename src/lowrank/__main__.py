"""``python -m lowrank`` works like the ``lowrank`` command."""

import sys

from lowrank.cli import main

sys.exit(main())
