"""``python -m asuka`` = the ``asuka`` command."""

import sys

from asuka.cli import main

sys.exit(main())
