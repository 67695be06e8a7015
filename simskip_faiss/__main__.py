"""`python -m simskip_faiss` runs the command line (the same as the `simskip-faiss` script)."""
import sys

from .cli import main

sys.exit(main())
