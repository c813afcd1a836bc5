"""tl_vlm: vision-language models as inspectable as TransformerLens made language models."""

from tl_vlm.cache_store import CacheArena
from tl_vlm.capabilities import Capabilities
from tl_vlm.config import TowerConfig, VLMConfig
from tl_vlm.families.clip import HookedCLIP
from tl_vlm.hooked_vlm import HookedVLM
from tl_vlm.inputs import VLMInputs
from tl_vlm.prompts import format_prompt
from tl_vlm.verify import verify  # the function: tl_vlm.verify(name, images=, prompts=)

__version__ = "0.1.0"

__all__ = ["CacheArena", "Capabilities", "HookedCLIP", "HookedVLM", "TowerConfig", "VLMConfig", "VLMInputs", "__version__", "format_prompt",
           "verify"]
