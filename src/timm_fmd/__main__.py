"""``python -m timm_fmd ...`` (what ``torchrun -m timm_fmd train ...`` runs): the command line."""
from .cli import main

raise SystemExit(main())
