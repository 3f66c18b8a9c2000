"""``python -m cipherpost`` is the ``cipherpost`` command."""

from .cli.main import main

raise SystemExit(main())
