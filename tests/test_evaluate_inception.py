"""fastdit.evaluate.inception: the FID Inception-v3 in the weights file's layout, its forward shapes, strict
loading with clear errors."""
import pytest
import torch

from fastdit.evaluate import inception

from _helpers import random_inception as _random_inception


def _conv(c_out, c_in, kh, kw=None):
    return (c_out, c_in, kh, kw if kw is not None else kh)


def expected_inception_layout():
    """Name -> conv weight shape of every conv of the 2015-12-05 FID Inception, as published."""
    convs = {"Conv2d_1a_3x3": _conv(32, 3, 3), "Conv2d_2a_3x3": _conv(32, 32, 3),
             "Conv2d_2b_3x3": _conv(64, 32, 3), "Conv2d_3b_1x1": _conv(80, 64, 1),
             "Conv2d_4a_3x3": _conv(192, 80, 3)}

    def block_a(name, cin, pool):
        convs.update({f"{name}.branch1x1": _conv(64, cin, 1), f"{name}.branch5x5_1": _conv(48, cin, 1),
                      f"{name}.branch5x5_2": _conv(64, 48, 5), f"{name}.branch3x3dbl_1": _conv(64, cin, 1),
                      f"{name}.branch3x3dbl_2": _conv(96, 64, 3), f"{name}.branch3x3dbl_3": _conv(96, 96, 3),
                      f"{name}.branch_pool": _conv(pool, cin, 1)})

    def block_c(name, c7):
        convs.update({f"{name}.branch1x1": _conv(192, 768, 1), f"{name}.branch7x7_1": _conv(c7, 768, 1),
                      f"{name}.branch7x7_2": _conv(c7, c7, 1, 7), f"{name}.branch7x7_3": _conv(192, c7, 7, 1),
                      f"{name}.branch7x7dbl_1": _conv(c7, 768, 1), f"{name}.branch7x7dbl_2": _conv(c7, c7, 7, 1),
                      f"{name}.branch7x7dbl_3": _conv(c7, c7, 1, 7), f"{name}.branch7x7dbl_4": _conv(c7, c7, 7, 1),
                      f"{name}.branch7x7dbl_5": _conv(192, c7, 1, 7), f"{name}.branch_pool": _conv(192, 768, 1)})

    def block_e(name, cin):
        convs.update({f"{name}.branch1x1": _conv(320, cin, 1), f"{name}.branch3x3_1": _conv(384, cin, 1),
                      f"{name}.branch3x3_2a": _conv(384, 384, 1, 3), f"{name}.branch3x3_2b": _conv(384, 384, 3, 1),
                      f"{name}.branch3x3dbl_1": _conv(448, cin, 1), f"{name}.branch3x3dbl_2": _conv(384, 448, 3),
                      f"{name}.branch3x3dbl_3a": _conv(384, 384, 1, 3),
                      f"{name}.branch3x3dbl_3b": _conv(384, 384, 3, 1), f"{name}.branch_pool": _conv(192, cin, 1)})

    block_a("Mixed_5b", 192, 32)
    block_a("Mixed_5c", 256, 64)
    block_a("Mixed_5d", 288, 64)
    convs.update({"Mixed_6a.branch3x3": _conv(384, 288, 3), "Mixed_6a.branch3x3dbl_1": _conv(64, 288, 1),
                  "Mixed_6a.branch3x3dbl_2": _conv(96, 64, 3), "Mixed_6a.branch3x3dbl_3": _conv(96, 96, 3)})
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        block_c(name, c7)
    convs.update({"Mixed_7a.branch3x3_1": _conv(192, 768, 1), "Mixed_7a.branch3x3_2": _conv(320, 192, 3),
                  "Mixed_7a.branch7x7x3_1": _conv(192, 768, 1), "Mixed_7a.branch7x7x3_2": _conv(192, 192, 1, 7),
                  "Mixed_7a.branch7x7x3_3": _conv(192, 192, 7, 1), "Mixed_7a.branch7x7x3_4": _conv(192, 192, 3)})
    block_e("Mixed_7b", 1280)
    block_e("Mixed_7c", 2048)
    shapes = {}
    for name, shape in convs.items():
        shapes[f"{name}.conv.weight"] = shape
        for b in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{b}"] = (shape[0],)
    shapes["fc.weight"] = (1008, 2048)
    shapes["fc.bias"] = (1008,)
    return shapes


def test_inception_state_dict_is_the_weights_file_layout():
    model = inception.FIDInceptionV3()
    want = expected_inception_layout()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()
           if not k.endswith("num_batches_tracked")}
    assert got == want
    assert len(want) == 94 * 5 + 2  # 94 conv+BN units and the 1008-way classifier
    # torchvision's Inception-v3 has 27,161,264 parameters; without the aux head (3,326,696) and
    # with 1008 instead of 1000 classes (+16,392) that is 23,850,960
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert inception.expected_state_dict_keys() == list(want)


def test_inception_forward_shapes_on_tiny_batch():
    model = _random_inception()
    with torch.no_grad():
        pool, logits = model(torch.rand(2, 3, 32, 32))
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(pool).all() and torch.isfinite(logits).all()
    assert pool.std() > 0 and (pool >= 0).all()  # mean of ReLU outputs
    torch.testing.assert_close(logits, model.fc(pool))
    with pytest.raises(ValueError, match="RGB"):
        model(torch.rand(2, 1, 32, 32))


def test_inception_weights_load_strictly_and_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        inception.load_fid_inception(None)
    with pytest.raises(FileNotFoundError, match=inception.WEIGHTS_FILENAME):
        inception.load_fid_inception(str(tmp_path / "nope.pth"))

    sd = {k: v for k, v in _random_inception(1).state_dict().items()
          if not k.endswith("num_batches_tracked")}  # like a converted file without counters
    path = tmp_path / "weights.pth"
    torch.save(sd, path)
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(path))
    loaded = inception.load_fid_inception(None)  # the env var route
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v)

    bad = dict(sd)
    bad.pop("Mixed_7c.branch_pool.conv.weight")
    bad["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    with pytest.raises(KeyError, match="Mixed_7c.branch_pool.conv.weight.*AuxLogits.fc.weight"):
        inception.load_inception_state_dict(inception.FIDInceptionV3(), bad)
    wrong = dict(sd, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    with pytest.raises(ValueError, match="fc.weight"):
        inception.load_inception_state_dict(inception.FIDInceptionV3(), wrong)

    # a torch.hub-style hash suffix that does not match the content warns (then the tiny file
    # fails the strict load)
    named = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"fc.bias": torch.zeros(1008)}, named)
    with pytest.warns(UserWarning, match="sha256"), pytest.raises(KeyError, match="missing"):
        inception.load_fid_inception(str(named))
