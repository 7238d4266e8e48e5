"""Pictures: the kept tokens after each pruning stage on the image (the paper's Fig. A1) and
the class token's hidden attention (``reference.hidden_attention``, averaged over channels,
both scan directions) for dense, "align", "hold" and "relabel" side by side on one colour
scale (the paper's Fig. 3).

    alignscan visualize [--image PATH] [--model NAME] [--checkpoint PATH] [--quick]

Default: digits test images with the trained digits ViM (science.digits, cached). With
--model, a ViM from ``models`` (random weights unless --checkpoint), its paper preset.
``--image`` is decoded by ``vision.read_image`` and put through the model's evaluation
transform: for a released model ``vision.eval_transform``, the function ``evaluate`` uses
(``imagenet.data.eval_transform``), so both feed the model the same tensor.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _load_image(path, transform):
    """The image file as the model's input (1, C, size, size): decoded to 8-bit RGB by
    ``vision.read_image`` (16-bit, palette, CMYK and grey images scaled, never clipped) and
    put through ``transform``, the model's evaluation transform."""
    from alignscan import vision
    return transform(vision.read_image(path))[None]


def _digits_transform(size):
    """The digits ViM's inputs (science.digits): grey in [0, 1], the whole square, no
    normalisation."""
    from alignscan import vision
    return vision.eval_transform(size, crop_pct=1.0, interpolation="bilinear", mean=(0.0,), std=(1.0,), channels=1)


def _shown(image, mean, std):
    """A model input (1, C, H, W) as the picture to draw: normalisation undone, in [0, 1]."""
    picture = image[0].permute(1, 2, 0).numpy() * np.asarray(std) + np.asarray(mean)
    return np.clip(picture[..., 0] if picture.shape[-1] == 1 else picture, 0.0, 1.0)


def class_token_attention(model, image):
    """(kept positions (M,), attention of the class token to each kept token (M,)) at the
    last layer: |α[cls, j]| averaged over channels, forward plus backward branch, rebuilt
    with ``reference.hidden_attention`` from the scans the model records."""
    import torch

    from alignscan import reference as R
    from alignscan.models import Recorder
    record = Recorder()
    with torch.no_grad():
        _, kept = model(image, return_kept=True, record=record)
    scans = record.scans
    L = model.num_tokens
    positions = kept[-1][0].numpy() if kept else np.arange(L)
    cls_at = int(np.flatnonzero(positions == model.cls_index)[0])
    attention = np.zeros(len(positions))
    for scan, flipped in ((scans[-2], False), (scans[-1], True)):     # last layer: forward, backward branch
        u, delta, A, B, C, D, z, bias, softplus = (t.detach().double().numpy() if hasattr(t, "detach") else t
                                                  for t in scan["args"])
        pmap = scan["position_map"]
        alpha = R.hidden_attention(u, delta, A, B, C, D, None, bias, softplus,
                                   positions=None if pmap is None else pmap.positions.numpy(),
                                   seqlen=None if pmap is None else pmap.seqlen,
                                   alignment=scan["alignment"])
        row = len(positions) - 1 - cls_at if flipped else cls_at
        a = np.abs(alpha[0, :, row, :]).mean(axis=0)
        attention += a[::-1] if flipped else a
    return positions, attention


def _grid_map(model, positions, values):
    """Values of tokens (class token dropped) on the patch grid; pruned patches NaN."""
    g = model.grid
    out = np.full(g * g, np.nan)
    for p, v in zip(positions, values):
        if p == model.cls_index:
            continue
        out[p if p < model.cls_index else p - 1] = v
    return out.reshape(g, g)


ATTENTION_MODES = ("dense", "align", "hold", "relabel")
PRUNED_COLOUR = (0.10, 0.55, 1.00)       # a blue no grey-scale input or inferno value has


def figure(model_factory, image, title, path, quick=False, shown=None):
    """Top row: the input and the kept tokens after each stage (align), pruned patches blue.
    Bottom row: the class token's attention for dense / align / hold / relabel on one colour
    scale (one colour bar), pruned patches blue. No panel is left empty. ``shown``: the
    picture of ``image`` to draw (default: ``image`` itself, taken to be in [0, 1])."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.patches import Patch

    from alignscan.outputs import save_figure
    align = model_factory("align")
    with torch.no_grad():
        _, kept = align(image, return_kept=True)
    shown = _shown(image, (0.0,), (1.0,)) if shown is None else shown
    cmap = "gray" if shown.ndim == 2 else None
    g = align.grid
    extent = (-0.5, shown.shape[1] - 0.5, shown.shape[0] - 0.5, -0.5)
    maps = {mode: _grid_map(align, *class_token_attention(model_factory(mode), image)) for mode in ATTENTION_MODES}
    top = max(np.nanmax(m) for m in maps.values())

    fig = plt.figure(figsize=(3.0 * max(len(kept) + 1, len(ATTENTION_MODES)) + 1.0, 6.6), layout="constrained")
    upper, lower = fig.subfigures(2, 1)
    axes = np.atleast_1d(upper.subplots(1, len(kept) + 1))
    axes[0].imshow(shown, cmap=cmap)
    axes[0].set_title("input")
    pruned_rgba = np.zeros((g, g, 4))
    pruned_rgba[..., :3] = PRUNED_COLOUR
    for s, positions in enumerate(kept, start=1):
        mask = _grid_map(align, positions[0].numpy(), np.ones(positions.shape[1]))
        overlay = pruned_rgba.copy()
        overlay[..., 3] = np.where(np.isnan(mask), 0.85, 0.0)
        axes[s].imshow(shown, cmap=cmap)
        axes[s].imshow(overlay, extent=extent, interpolation="nearest")
        axes[s].set_title(f"after stage {s}: {positions.shape[1]} tokens")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1].legend(handles=[Patch(color=PRUNED_COLOUR, label="pruned")], loc="lower right", fontsize=8)
    heat = plt.get_cmap("inferno").with_extremes(bad=PRUNED_COLOUR)
    bottom = np.atleast_1d(lower.subplots(1, len(ATTENTION_MODES)))
    for ax, mode in zip(bottom, ATTENTION_MODES):
        im = ax.imshow(np.ma.masked_invalid(maps[mode]), cmap=heat, vmin=0.0, vmax=top, interpolation="nearest")
        ax.set_title(f"{mode}: class-token attention")
        ax.set_xticks([])
        ax.set_yticks([])
    lower.colorbar(im, ax=list(bottom), shrink=0.85, label="|alpha| (class token row, channel mean)")
    heading = (f"{title}\ntop: kept tokens after each stage (align); bottom: the class token's hidden attention at "
               "the last layer, both scan directions, one colour scale; blue: pruned")
    if quick:
        heading = "SMOKE TEST (--quick): a model trained for seconds\n" + heading
    fig.suptitle(heading, fontsize=9, color="red" if quick else "black")
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def run(out_dir, image_path=None, model_name=None, checkpoint=None, quick=False, cache_dir=None, log=print):
    import torch

    from alignscan import models
    from alignscan.models.pruning import PruningConfig
    from alignscan.science.digits import DigitsConfig, build_model, load_digits_split, trained_model
    if image_path is not None and not Path(image_path).is_file():
        raise ValueError(f"image must be an existing image file (PNG or JPEG), got {str(image_path)!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model_name is None:
        cfg = DigitsConfig(epochs=1, train_subset=128, embed_dim=32) if quick else DigitsConfig()
        base, info = trained_model(cfg, cache_dir or out_dir / "cache", log=log)
        weights = f"digits ViM trained here ({info['path']})"

        def factory(mode):
            pruning = None if mode == "dense" else PruningConfig(mode=mode, schedule=(2, 4, 6), keep_ratio=0.6)
            m = build_model(cfg, pruning=pruning)
            m.load_state_dict(base.state_dict())
            return m.eval()
        mean, std = (0.0,), (1.0,)
        if image_path:
            images = [_load_image(image_path, _digits_transform(cfg.img_size))]
        else:
            _, _, x_test, _ = load_digits_split(cfg.img_size, cfg.split_seed)
            images = [x_test[i:i + 1] for i in (0, 1, 2)]
    else:
        from alignscan import registry
        if registry.family(model_name) != "vim":
            raise ValueError(f"model must be a ViM (the class-token attention needs one): "
                             f"{' or '.join(registry.names('vim'))}, got {model_name!r}")
        kwargs = dict(img_size=64) if quick else {}
        torch.manual_seed(0)
        base = models.create(model_name, **kwargs)
        if checkpoint:
            models.load_checkpoint(base, checkpoint)
        weights = f"{model_name} with {'weights from ' + str(checkpoint) if checkpoint else 'random weights'}"

        def factory(mode):
            m = models.create(model_name, pruning=None if mode == "dense" else models.paper_preset(model_name, mode=mode),
                              **kwargs)
            m.load_state_dict(base.state_dict())
            return m.eval()
        size = kwargs.get("img_size", 224)
        if image_path:
            # The released models' evaluation transform: the very function evaluate uses.
            from alignscan import vision
            images, mean, std = [_load_image(image_path, vision.eval_transform(size))], vision.MEAN, vision.STD
        else:
            rng = torch.Generator().manual_seed(0)
            images, mean, std = [torch.rand(1, 3, size, size, generator=rng)], (0.0,), (1.0,)
    paths = []
    for i, image in enumerate(images):
        paths.append(figure(factory, image, f"weights: {weights}; image: {image_path or f'test image {i}'}",
                            out_dir / f"visualize_{i}.png", quick=quick, shown=_shown(image, mean, std)))
    return {"figures": [str(p) for p in paths], "weights": weights}
