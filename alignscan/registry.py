"""One row per model name: every fact the project knows about a model, in one torch-free table.

The models (``alignscan.models``: configs, builders), the FLOP counter (the paper's GFLOPs),
the pruning presets, the command line (its choices) and every subcommand read this table;
nothing else keeps a copy. Facts are from the official code and the paper (docs/SPEC.md §5).

    from alignscan import registry
    card = registry.card("vim_small")
    card.family, card.config, card.schedule, card.keep_ratio, card.paper_gflops

The pruning choices every model offers (``MODES``, ``CONV_MODES``) sit here too, so that
the command line can offer them without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

# What becomes of the pruned tokens (SPEC §4): defined with its reference, offered from here.
from alignscan.reference.pruned_tokens import PRUNED_TOKENS

__all__ = ["ModelCard", "CARDS", "NAMES", "FAMILIES", "MODES", "PRUNED_TOKENS", "CONV_MODES", "card", "family", "names"]

# Pruning modes (alignscan.models.pruning says what each does) and ViM's conv1d under pruning.
MODES = ("dense", "align", "hold", "self", "relabel", "mask")
CONV_MODES = ("compact", "position_aware")
FAMILIES = ("vim", "plainmamba")


@dataclass(frozen=True)
class ModelCard:
    """The facts of one model name.

    Attributes:
        name: the name ``models.create`` and the command line take.
        family: "vim" or "plainmamba" (which class builds it, which checkpoint layout it has).
        config: the builder's architecture arguments (width, depth, stem).
        schedule: the paper's pruning schedule, 1-based layers ("after layer 5").
        keep_ratio: the keep ratio per stage that gives the paper's pruned GFLOPs.
        count_rule: how many tokens a stage keeps ("vim": the released ViM code's rule).
        paper_gflops: (dense, pruned) GFLOPs of the paper's Table 1.
        paper_top1: (dense, align fine-tuned, relabel fine-tuned) ImageNet top-1 of Table 1.
        checkpoint: the released checkpoint's file name, where the release names it.
        checkpoint_layout: the top-level key of the released file ("model": ViM's DeiT
            layout; "state_dict": PlainMamba's mmcls layout).
    """

    name: str
    family: str
    config: dict = field(hash=False)
    schedule: tuple
    keep_ratio: float
    count_rule: str
    paper_gflops: tuple
    paper_top1: tuple
    checkpoint: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))

    @property
    def checkpoint_layout(self):
        return "model" if self.family == "vim" else "state_dict"

    @property
    def preset(self):
        """The paper's pruning preset as PruningConfig arguments (without the mode)."""
        return dict(schedule=self.schedule, keep_ratio=self.keep_ratio, count_rule=self.count_rule)


CARDS = MappingProxyType({c.name: c for c in (
    ModelCard("vim_tiny", "vim", dict(embed_dim=192, depth=24), schedule=(10, 20), keep_ratio=0.8, count_rule="vim",
              paper_gflops=(1.50, 1.29), paper_top1=(76.1, 75.1, 71.3), checkpoint="vim_t_midclstok_76p1acc.pth"),
    ModelCard("vim_small", "vim", dict(embed_dim=384, depth=24), schedule=(5, 10, 15), keep_ratio=0.8,
              count_rule="vim", paper_gflops=(5.10, 3.60), paper_top1=(80.5, 78.8, 74.8),
              checkpoint="vim_s_midclstok_80p5acc.pth"),
    ModelCard("plainmamba_l1", "plainmamba", dict(embed_dim=192, depth=24, stem_convs=1, dw_after_first=True),
              schedule=(5, 10), keep_ratio=0.8, count_rule="ceil", paper_gflops=(3.0, 2.46),
              paper_top1=(77.9, 77.4, 75.0)),
    ModelCard("plainmamba_l2", "plainmamba", dict(embed_dim=384, depth=24, stem_convs=2, dw_after_first=False),
              schedule=(5, 10, 15), keep_ratio=0.82, count_rule="ceil", paper_gflops=(8.1, 6.27),
              paper_top1=(81.6, 81.0, 78.3)),
    ModelCard("plainmamba_l3", "plainmamba", dict(embed_dim=448, depth=36, stem_convs=2, dw_after_first=False),
              schedule=(5, 11, 17, 23), keep_ratio=0.74, count_rule="ceil", paper_gflops=(14.4, 8.44),
              paper_top1=(82.3, 81.7, 78.9)),
)})
NAMES = tuple(CARDS)


def card(name):
    """The card of a model name; ValueError naming ``name`` and the known names otherwise."""
    if name not in CARDS:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")
    return CARDS[name]


def family(name):
    """"vim" or "plainmamba" for a model name."""
    return card(name).family


def names(family_name=None):
    """The model names, all or those of one family."""
    return tuple(n for n, c in CARDS.items() if family_name is None or c.family == family_name)
