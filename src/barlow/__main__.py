"""``python -m barlow`` is the ``barlow`` command."""

from barlow.cli import main

raise SystemExit(main())
