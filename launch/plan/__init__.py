"""The capacity planner: memory, communication, pipeline bubble and throughput of a layout, from the
config alone (`python -m launch.plan`)."""

from .memory import (Layout, RankMemory, StageShapes, layout_of, memory_of, meta_model, rank_memory,
                     rank_parameter_elements)

__all__ = ["Layout", "RankMemory", "StageShapes", "layout_of", "memory_of", "meta_model", "rank_memory",
           "rank_parameter_elements"]
