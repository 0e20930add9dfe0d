"""Decode heads; importing registers them."""
from . import atm, bilinear, deeplabv3plus, fcn, nrd, setr  # noqa: F401
