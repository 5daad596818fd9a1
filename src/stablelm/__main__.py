"""`python -m stablelm` (and `torchrun ... -m stablelm`): the command line."""

from .cli import main

raise SystemExit(main())
