"""`python -m avatar.app ...` is the `avatar` command."""

import sys

from avatar.app.cli import main

sys.exit(main())
