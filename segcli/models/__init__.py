"""Models: importing this package registers every backbone, head and segmentor."""
from . import segmentor  # noqa: F401
from .backbones import *  # noqa: F401,F403
from .heads import *  # noqa: F401,F403
from . import continual, dtop, shrunk  # noqa: F401,E402  (register the wrapper segmentors)
from .builder import build_backbone, build_head, build_segmentor  # noqa: F401
