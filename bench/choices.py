"""The choices the command line offers, without importing torch (``--help`` stays fast): all
read from their one home (model names and pruning modes: ``alignscan.registry``; metrics:
the reference)."""
from alignscan.reference.importance import METRICS
from alignscan.registry import CONV_MODES, MODES
from alignscan.registry import NAMES as MODEL_NAMES

__all__ = ["MODEL_NAMES", "CONV_MODES", "METRICS", "MODES"]
