"""`python -m cepdist` is the `cepdist` command."""
import sys

from .cli import main

sys.exit(main())
