"""``python -m app.cli``: the ``saelab`` command."""

from app.cli import main

main()
