"""Allow ``python -m greyarray``."""

from greyarray.cli import main

raise SystemExit(main())
