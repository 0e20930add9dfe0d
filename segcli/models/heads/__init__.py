"""Decode heads; importing this package registers them.

A new head is one file in this folder plus its import line below. The file holds the head's
config dataclass, the head (a :class:`~segcli.models.base.LogitHead` when it outputs class
logits trained with pixel CE: it then writes only its feature path; otherwise a
:class:`~segcli.models.base.DecodeHead`) and a builder registered with
``@HEADS.register("name", Config)``, after which recipes can say ``type: name``. Overriding
``input_layer`` / ``supports_token_input`` / ``forward_tokens`` lets DToP run it between blocks.
"""
from . import atm  # noqa: F401
from . import bilinear  # noqa: F401
from . import deeplabv3plus  # noqa: F401
from . import fcn  # noqa: F401
from . import nrd  # noqa: F401
from . import setr  # noqa: F401
