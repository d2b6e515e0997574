"""Fused kernels for the MOLERE reproduction (see weighted_ce.py)."""
from .weighted_ce import weighted_cross_entropy

__all__ = ["weighted_cross_entropy"]
