"""Temporary shim: the code moved to `eridiffusion.networks`; deleted once train.py moves."""
from eridiffusion.networks import *  # noqa: F401,F403
