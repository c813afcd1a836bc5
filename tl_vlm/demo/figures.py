"""The demo's PNG figures: the scene pair, the logit-lens maps and the patching curves and layer x position map."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import ImageDraw

from tl_vlm.analysis import viz
from tl_vlm.demo.experiment import Result

FIGURES = {
    "scene": "scene.png",
    "localization": "localization.png",
    "confidence_map": "confidence_map.png",
    "patching_curves": "patching_curves.png",
    "patching_layer_position": "patching_layer_position.png",
}
IMAGE_TOKENS = ("<image>", "<|image_pad|>", "<|video_pad|>")


def draw_figures(out: Path, result: Result) -> dict[str, str]:
    """Write the figures into ``out``; returns figure key -> file name (the layer x position map only if it ran)."""
    out.mkdir(parents=True, exist_ok=True)
    patching, word = result.report["patching"], result.clean.answer

    _scene_pair(result).savefig(out / FIGURES["scene"], dpi=120, bbox_inches="tight")
    boxed = result.clean.image.copy()
    ImageDraw.Draw(boxed).rectangle(tuple(result.clean.objects[0]["box"]), outline=(0, 255, 255))
    viz.heatmap_over_image(boxed, result.heat.numpy(), out / FIGURES["localization"],
                           title=f"logit lens p({word!r}), max over layers; box = object")
    viz.layer_position_map(result.confidence.numpy(), out / FIGURES["confidence_map"], xlabel="image token",
                           ylabel="language layer (input; last = final)", title=f"logit lens p({word!r})")

    _patching_curves(patching).savefig(out / FIGURES["patching_curves"], dpi=120, bbox_inches="tight")
    figures = {k: v for k, v in FIGURES.items() if k != "patching_layer_position"}
    if patching["layer_position"] is not None:
        fig = _layer_position(patching["layer_position"], patching["positions"])
        fig.savefig(out / FIGURES["patching_layer_position"], dpi=120, bbox_inches="tight")
        figures["patching_layer_position"] = FIGURES["patching_layer_position"]
    return figures


def _scene_pair(result: Result) -> Figure:
    """The clean scene and its repainted twin, the object's box drawn on both."""
    x0, y0, x1, y1 = result.clean.objects[0]["box"]
    fig = Figure(figsize=(6, 3.2))
    for k, (ex, title) in enumerate(((result.clean, "clean"), (result.corrupted, "corrupted"))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.imshow(ex.image)
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor="cyan",
                               linewidth=1.5))
        ax.set_title(f"{title}: {ex.answer}")
        ax.set_axis_off()
    return fig


def _patching_curves(patching: dict) -> Figure:
    """Per-layer patching scores, language layers left and vision layers right."""
    fig = Figure(figsize=(9, 3.5))
    panels = {  # x label -> (legend, patching key) per curve; region curves only where region patching ran
        "language layer (resid_pre)": [("all image tokens", "language_resid_pre_at_image_positions"),
                                       ("object box tokens", "language_resid_pre_object_region"),
                                       ("rest of the image", "language_resid_pre_rest_of_image")],
        "vision layer (resid_pre)": [("whole image", "vision_resid_pre"),
                                     ("object box patches", "vision_resid_pre_object_region"),
                                     ("rest of the image", "vision_resid_pre_rest_of_image")],
    }
    for i, (xlabel, curves) in enumerate(panels.items()):
        ax = fig.add_subplot(1, 2, i + 1)
        for (label, key), marker in zip(curves, "osx"):
            if key in patching:
                ax.plot(range(len(patching[key])), patching[key], marker=marker, label=label)
        ax.set_xlabel(xlabel)
        ax.set_xticks(range(len(patching[curves[0][1]])))
        ax.legend(fontsize="small")
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.axhline(1, color="grey", linewidth=0.6, linestyle=":")
    fig.axes[0].set_ylabel("clean answer restored")
    return fig


def _layer_position(grid: list[list[float]], labels: list[str]) -> Figure:
    """The [layer, position] patching map; text positions labelled, the image span bracketed."""
    fig = Figure(figsize=(min(24, max(6, len(labels) / 5)), 1.5 + 0.5 * len(grid)))
    ax = fig.add_subplot()
    shown = ax.imshow(grid, aspect="auto", origin="lower", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax)
    text_at = [i for i, lab in enumerate(labels) if lab not in IMAGE_TOKENS]
    ax.set_xticks(text_at, [labels[i] for i in text_at], rotation=90, fontsize=6)
    image_at = [i for i, lab in enumerate(labels) if lab in IMAGE_TOKENS]
    if image_at:
        for x in (image_at[0] - 0.5, image_at[-1] + 0.5):
            ax.axvline(x, color="k", linewidth=0.8, linestyle="--")
        ax.text((image_at[0] + image_at[-1]) / 2, 1.01, f"image tokens ({len(image_at)})", ha="center", va="bottom",
                fontsize=7, transform=ax.get_xaxis_transform())
    ax.set_yticks(range(len(grid)))
    ax.set_ylabel("language layer")
    ax.set_title("clean resid_pre patched at one position (1 = clean answer restored)", pad=14)
    return fig
