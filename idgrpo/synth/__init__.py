"""Synthetic multi-person world (seeded sprite identities, exact boxes) and its oracle identity metric."""

from idgrpo.synth.oracle import OracleScore, oracle_consistency
from idgrpo.synth.world import REFERENCE_BACKGROUND, Identity, Scene, World, WorldConfig, make_identity

__all__ = ["REFERENCE_BACKGROUND", "Identity", "OracleScore", "Scene", "World", "WorldConfig", "make_identity",
           "oracle_consistency"]
