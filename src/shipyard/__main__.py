"""`python -m shipyard` (used by torchrun: `torchrun -m shipyard train ...`)."""

from shipyard.cli import main

main()
