"""miles: RL post-training for MoE language models.

The library knows nothing of Prefect: flows/ and tasks/ wrap it. See DESIGN.md in the shared docs.
"""

from miles_core.errors import MilesError

__all__ = ["MilesError"]
__version__ = "0.1.0"
