"""Checkpoints of other codebases -> segcli: safe reading (``reader.py``), key maps with every
tensor accounted for (``keymap.py``) and the maps of each released format (``segvit.py``)."""
