"""`python -m scc.cli ...` is `scc ...`."""
import sys

from . import main

sys.exit(main())
