import pytest
import torch

from training.network import (BACKBONES, MelanomaNet, imagenet_weights_path, load_checkpoint,
                              save_checkpoint)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {b: MelanomaNet(b) for b in BACKBONES}


def _legacy_state(net: MelanomaNet, bprefix: str, hprefix: str) -> dict:
    sd = {f"{bprefix}{k}": torch.randn_like(v) if v.is_floating_point() else v
          for k, v in net.backbone.state_dict().items()}
    sd[f"{hprefix}weight"] = torch.randn(1, 2048)
    sd[f"{hprefix}bias"] = torch.randn(1)
    return sd


def test_forward_shapes(nets):
    m = nets["se_resnet50"].eval()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        logits, emb = m.forward_with_embedding(x)
        assert logits.shape == (2,) and emb.shape == (2, 2048)
        assert torch.allclose(m(x), logits) and torch.allclose(m.forward_features(x), emb)
    assert isinstance(m.pool, torch.nn.AdaptiveAvgPool2d) and m.head.out_features == 1


def test_forward_tta_averages_the_four_flips_and_plain_pass_without_tta(nets):
    m = nets["se_resnet50"].eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = [m.forward_with_embedding(torch.flip(x, d) if d else x) for d in ((), (3,), (2,), (2, 3))]
        logits, emb = m.forward_tta(x, tta=True)
        assert torch.allclose(logits, sum(o[0] for o in outs) / 4, atol=1e-5)
        assert torch.allclose(emb, sum(o[1] for o in outs) / 4, atol=1e-5)
        plain_logits, plain_emb = m.forward_tta(x, tta=False)
        assert torch.allclose(plain_logits, outs[0][0]) and torch.allclose(plain_emb, outs[0][1])
        assert not torch.allclose(logits, plain_logits)


@pytest.mark.parametrize("backbone,bprefix,hprefix,source", [
    ("se_resnext50_32x4d", "model.", "out.", "notebook"),
    ("se_resnet50", "base_model.", "l0.", "flask"),
    ("se_resnet50", "model.", "out.", "notebook"),
])
def test_legacy_layouts(tmp_path, nets, backbone, bprefix, hprefix, source):
    sd = _legacy_state(nets[backbone], bprefix, hprefix)
    path = tmp_path / "legacy.pth"
    torch.save(sd, path)
    model, card = load_checkpoint(path)
    assert model.backbone_name == backbone and not model.training
    assert card["source"] == source and card["validated"] is False and card["input_size"] == 224
    assert card["architecture"] == backbone and card["threshold"] == 0.5 and card["metrics"] == {}
    assert torch.equal(model.head.weight, sd[f"{hprefix}weight"])
    k = "layer1.0.conv2.weight"
    assert torch.equal(model.backbone.state_dict()[k], sd[bprefix + k])
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_our_format_roundtrip_fp16(tmp_path, nets):
    m = nets["se_resnet50"]
    path = tmp_path / "model.pt"
    save_checkpoint(path, m, {"input_size": 96, "threshold": 0.3}, fp16=True)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "melanoma-records/1" and raw["backbone"] == "se_resnet50"
    assert raw["input_size"] == 96 and raw["state_dict"]["head.weight"].dtype == torch.float16
    model, card = load_checkpoint(path)
    assert card["threshold"] == 0.3 and card["architecture"] == "se_resnet50"
    assert model.head.weight.dtype == torch.float32
    assert torch.allclose(model.head.weight, m.head.weight.half().float())


def test_garbage_is_refused(tmp_path, nets):
    cases = {
        "text.pt": None,
        "tensor.pt": torch.randn(3),
        "random_keys.pt": {"foo.weight": torch.randn(2), "bar": torch.randn(1)},
        "other_format.pt": {"format": "something/9", "state_dict": {}},
        "wrong_head.pt": {**{f"model.{k}": v for k, v in nets["se_resnet50"].backbone.state_dict().items()},
                          "out.weight": torch.randn(2, 2048), "out.bias": torch.randn(2)},
    }
    for name, obj in cases.items():
        path = tmp_path / name
        if obj is None:
            path.write_text("not a checkpoint")
        else:
            torch.save(obj, path)
        with pytest.raises(ValueError, match=name):
            load_checkpoint(path)
    sd = _legacy_state(nets["se_resnet50"], "model.", "out.")
    sd["model.layer1.0.conv2.weight"] = torch.randn(32, 32, 3, 3)
    torch.save(sd, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="layer1.0.conv2.weight shape"):
        load_checkpoint(tmp_path / "odd.pt")


def test_pretrained_weights(tmp_path, monkeypatch, nets):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    expected = imagenet_weights_path("se_resnet50")
    assert expected.startswith(str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="se_resnet50-ce0d4300.pth"):
        MelanomaNet("se_resnet50", pretrained_weights="imagenet")
    import os

    os.makedirs(os.path.dirname(expected))
    torch.save(nets["se_resnet50"].backbone.state_dict(), expected)
    m = MelanomaNet("se_resnet50", pretrained_weights="imagenet")
    k = "layer0.conv1.weight"
    assert torch.equal(m.backbone.state_dict()[k], nets["se_resnet50"].backbone.state_dict()[k])
    m2 = MelanomaNet("se_resnet50", pretrained_weights=expected)
    assert torch.equal(m2.backbone.state_dict()[k], m.backbone.state_dict()[k])
