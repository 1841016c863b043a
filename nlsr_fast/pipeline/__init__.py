"""The realign pipeline, one small module per stage: amplify -> score -> similarity -> select -> restore -> write.

Each stage is a plain function on {module: (A, B)} factor dicts and PackedMasks, so other tools can embed them.
"""

from nlsr_fast.pipeline.amplify import amplify
from nlsr_fast.pipeline.restore import changed_entries, restore
from nlsr_fast.pipeline.score import masks_from_statistics, score, sequential_transform
from nlsr_fast.pipeline.select import Selection, adaptive_probabilities, rank_positions, select
from nlsr_fast.pipeline.similarity import similarity

__all__ = [
    "Selection",
    "adaptive_probabilities",
    "amplify",
    "changed_entries",
    "masks_from_statistics",
    "rank_positions",
    "restore",
    "score",
    "select",
    "sequential_transform",
    "similarity",
]
