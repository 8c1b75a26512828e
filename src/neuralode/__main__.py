"""``python -m neuralode ...``: same as the ``neuralode`` command."""

from neuralode.cli import main

raise SystemExit(main())
