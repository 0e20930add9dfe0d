"""Backbones; importing registers them."""
from . import resnet, vit  # noqa: F401
