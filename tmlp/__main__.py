"""``python -m tmlp ...`` runs the command line (and ``torchrun ... -m tmlp ...``)."""
from tmlp.cli import main

main()
