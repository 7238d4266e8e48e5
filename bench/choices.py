"""The choices the command line offers, without importing torch (``python -m bench --help``
stays fast). Model names and conv modes mirror ``models.NAMES`` and
``models.pruning.CONV_MODES`` (a test keeps them equal); metrics are the reference's."""
from reference.importance import METRICS

__all__ = ["MODEL_NAMES", "CONV_MODES", "METRICS"]

MODEL_NAMES = ("vim_tiny", "vim_small", "plainmamba_l1", "plainmamba_l2", "plainmamba_l3")
CONV_MODES = ("compact", "position_aware")
