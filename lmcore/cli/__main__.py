"""``python -m lmcore.cli`` (what ``accelerate launch -m lmcore.cli`` runs)."""

import sys

from lmcore.cli.main import main

sys.exit(main())
