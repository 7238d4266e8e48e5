"""The design of the zero-shot experiment: its factors and their levels, in one place."""
from alignscan.registry import CONV_MODES

__all__ = ["KEEP_RATIOS", "MODES", "PAIRS", "CONVS", "FINETUNE_MODES", "FINETUNE_RATIOS", "SIGNIFICANCE",
           "SPAN_REMOVED", "SPAN_SIDES", "PRIMARY", "SEEDS"]

KEEP_RATIOS = (0.9, 0.7, 0.5, 0.3)
MODES = ("align", "hold", "self", "relabel", "mask")
PAIRS = (("align", "relabel"), ("hold", "relabel"), ("hold", "align"))
CONVS = CONV_MODES                 # ViM's conv1d: over the compacted tokens, or position-aware
FINETUNE_MODES = ("align", "hold", "relabel")
FINETUNE_RATIOS = (0.5, 0.3)
SIGNIFICANCE = 0.05
# The distance task's span-controlled cells: this many background tokens removed per image,
# all inside the span joining the marks and the class token, or all outside it.
SPAN_REMOVED = (4, 8, 12)
SPAN_SIDES = ("inside", "outside")
# The primary comparison, fixed before any run: align - relabel accuracy with the compact
# conv under condition (a) (8 background tokens removed inside the span), tested across
# training seeds (sign test and t-interval of the per-seed difference). Every other
# across-seed row is Holm-corrected within its task.
PRIMARY = {"conv": "compact", "side": "inside", "removed": 8, "a": "align", "b": "relabel"}
SEEDS = (0, 1, 2, 3, 4)
