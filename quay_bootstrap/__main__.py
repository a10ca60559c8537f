"""`python -m quay_bootstrap` runs the same CLI as the console script."""
import sys

from quay_bootstrap.cli import main

sys.exit(main())
