"""``python -m fastmask`` (and ``torchrun ... -m fastmask``): the ``fastmask`` command line."""

from fastmask.app.cli import main

raise SystemExit(main())
