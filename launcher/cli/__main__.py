"""``python -m launcher.cli``: the ``duckcell`` command."""

import sys

from .main import main

sys.exit(main())
