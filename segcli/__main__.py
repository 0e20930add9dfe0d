"""``python -m segcli`` (used by ``torchrun --nproc_per_node=N -m segcli train ...``)."""
from .cli import main

main()
