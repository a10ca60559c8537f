"""`python -m tests.testbed start|stop|status DIR`."""

import sys

from tests.testbed.bed import main

sys.exit(main())
