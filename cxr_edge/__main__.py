"""``python -m cxr_edge`` runs the ``cxr-edge`` command line."""
from cxr_edge.cli import main

main()
