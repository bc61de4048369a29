"""Explanation heatmaps (Grad-CAM) for the worker. torch is imported only inside the functions that
run the network (the worker's), so importing this module costs the web process nothing.

Grad-CAM (Selvaraju et al., 2017) over the network's last convolutional feature map: each channel
is weighted by the mean gradient of the melanoma logit with respect to it, the weighted sum is
rectified and normalised to 0..1. It shows where in the image the evidence for the score lies,
not why; the model sees the image resized to its square input, so the map is stretched back to
the image's own proportions.

The network comes from ONE function, :func:`heatmap_network`, so that how a predictor holds its
network (one model, an ensemble) is adapted in one place. A network used here exposes
``feature_map(x) -> (N, C, h, w)`` and ``logit_from_map(fmap) -> (N,)``.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

METHOD = "grad-cam"
MAX_SIDE = 512  # the stored heatmap's long side (it is shown stretched over the image)


def heatmap_network(predictor):
    """The network whose Grad-CAM explains this predictor's score: its first member network (a
    single-checkpoint version's only one; for an ensemble, the first member, named in the facts)."""
    return predictor.model


def _input_of(predictor, network) -> tuple[int, str, str]:
    """(input size, normalisation, member name) with which ``network`` sees an image."""
    for member in getattr(getattr(predictor, "bundle", None), "members", []) or []:
        if member.model is network:
            return member.input_size, member.normalisation, member.name
    return int(predictor.input_size), "imagenet", ""


def gradcam(network, batch) -> np.ndarray:
    """Grad-CAM maps (N, h, w) in 0..1 for the melanoma logit of each image of ``batch``.

    ``batch`` is the model input (N, 3, H, W), preprocessed exactly as for scoring. Runs in fp32
    with gradients enabled; the network's weights are not changed.
    """
    import torch

    with torch.enable_grad():
        fmap = network.feature_map(batch.float()).detach().float().requires_grad_(True)
        logits = network.logit_from_map(fmap)
        grads, = torch.autograd.grad(logits.sum(), fmap)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
    cam = torch.relu((weights * fmap.detach()).sum(dim=1))  # (N, h, w)
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12).view(-1, 1, 1)
    cam = torch.where(peak > 1e-12, cam / peak, torch.zeros_like(cam))
    return cam.numpy().astype(np.float32)


def _colormap(values: np.ndarray) -> np.ndarray:
    """0..1 -> RGB uint8 (blue, cyan, yellow, red: a "jet"-like scale without matplotlib)."""
    stops = np.array([0.0, 0.35, 0.65, 1.0])
    colours = np.array([[40, 60, 255], [0, 220, 255], [255, 230, 0], [230, 20, 20]], dtype=np.float32)
    v = np.clip(values, 0, 1)
    rgb = np.stack([np.interp(v, stops, colours[:, c]) for c in range(3)], axis=-1)
    return rgb.astype(np.uint8)


def heatmap_png(cam: np.ndarray, *, width: int, height: int) -> bytes:
    """A transparent PNG overlay of one map at the image's proportions (long side <= MAX_SIDE):
    colour by strength, and the weaker the evidence the more transparent."""
    scale = min(1.0, MAX_SIDE / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8), mode="L")
    resized = np.asarray(small.resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    rgba = np.empty((size[1], size[0], 4), dtype=np.uint8)
    rgba[..., :3] = _colormap(resized)
    rgba[..., 3] = (np.clip((resized - 0.15) / 0.85, 0, 1) * 200).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def explain_image(predictor, source, *, width: int, height: int) -> tuple[bytes, dict]:
    """(PNG overlay, facts) for one stored image (path or binary file object), decoded and
    normalised exactly as the explained network sees it when scoring (no flip TTA)."""
    from training.preprocessing import load_rgb, to_batch

    network = heatmap_network(predictor)
    size, normalisation, member = _input_of(predictor, network)
    batch = to_batch([load_rgb(source, size)], normalisation)
    with predictor.lock:
        cam = gradcam(network, batch)[0]
    return heatmap_png(cam, width=width, height=height), {
        "method": METHOD, "input_size": int(size), "member": member, "map_size": list(cam.shape),
        "peak_position": [int(x) for x in np.unravel_index(int(np.argmax(cam)), cam.shape)],  # (row, col) on the map
    }
