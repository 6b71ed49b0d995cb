"""`python -m noomnim_client scenario ...`: the cut-off scenario (see the package docs)."""

from . import main

main()
