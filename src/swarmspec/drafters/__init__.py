"""Drafters: everything that proposes tokens for the target to verify."""

from swarmspec.drafters.base import Draft, Drafter
from swarmspec.drafters.model import ModelDrafter

__all__ = ["Draft", "Drafter", "ModelDrafter"]
