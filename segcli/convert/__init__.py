"""Checkpoints of other codebases -> segcli: safe reading (``reader.py``), key maps with every
tensor accounted for (``keymap.py``), the maps of each released format (``segvit.py``,
``mmseg.py``) and what a model is from its tensors' shapes (``architecture.py``)."""
