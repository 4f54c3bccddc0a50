"""`python -m hgad_edge.cli VERB ...` (how ServeProcess starts `hgad-edge serve`)."""

from hgad_edge.cli import main

main()
