"""`python -m tests.testbed start|stop|status DIR`, and
`python -m tests.testbed quay-image TAG --push HOST:PORT/REPO` (real Quay, tests/testbed/real_quay.py)."""

import sys

if sys.argv[1:2] == ["quay-image"]:
    from tests.testbed.real_quay import main as quay_image

    sys.exit(quay_image(sys.argv[2:]))

from tests.testbed.bed import main  # noqa: E402

sys.exit(main())
