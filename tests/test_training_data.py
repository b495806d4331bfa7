"""Datasets, the ADM centre crop, the deterministic distributed batch order and the EMA arithmetic."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.training.data import (DigitsDataset, LatentDataset, RankBatchSampler, center_crop_arr, epoch_order,
                          list_image_folder, load_digits_images)


# ----------------------------------------------------------------------------------------------
# ADM centre crop
# ----------------------------------------------------------------------------------------------
def test_center_crop_without_resize_is_the_middle_square():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (16, 30, 3), dtype=np.uint8)  # short side == target: no resize
    out = center_crop_arr(Image.fromarray(arr), 16)
    np.testing.assert_array_equal(out, arr[:, 7:23])
    arr = rng.integers(0, 256, (25, 16, 3), dtype=np.uint8)  # portrait: crop rows
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(arr), 16), arr[4:20])


def test_center_crop_box_halving_of_block_constant_image():
    # 64x64 made of constant 4x4 blocks, target 16: two exact box halvings, then no resize.
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    arr = np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)
    out = center_crop_arr(Image.fromarray(arr), 16)
    np.testing.assert_array_equal(out, blocks)


def test_center_crop_shape_for_odd_sizes():
    for w, h in [(500, 375), (37, 101), (256, 256), (300, 257)]:
        img = Image.new("RGB", (w, h), (10, 200, 30))
        out = center_crop_arr(img, 64)
        assert out.shape == (64, 64, 3)
        assert np.abs(out.astype(int) - np.array([10, 200, 30])).max() <= 1


def test_list_image_folder_sorted(tmp_path):
    for cls, names in {"b": ["2.png", "1.jpg"], "a": ["z.PNG", "notes.txt"], "c": []}.items():
        (tmp_path / cls).mkdir()
        for n in names:
            (tmp_path / cls / n).write_bytes(b"x")
    paths, labels, classes = list_image_folder(str(tmp_path))
    assert classes == ["a", "b", "c"]
    assert [os.path.relpath(p, tmp_path) for p in paths] == ["a/z.PNG", "b/1.jpg", "b/2.png"]
    assert labels == [0, 1, 1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_image_folder(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------------------------
# Digits
# ----------------------------------------------------------------------------------------------
def test_digits_native_size_is_the_sklearn_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = load_digits_images(8)
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    np.testing.assert_allclose(x[:, 0].numpy(), d.images / 16.0 * 2 - 1, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), d.target)


def test_digits_upsampled_dataset():
    ds = DigitsDataset(16)
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.channels == 1
    x, y = ds[(5, 0)]
    xf, yf = ds[(5, 1)]
    assert x.shape == (1, 16, 16) and -1 <= x.min() and x.max() <= 1 and y == yf
    torch.testing.assert_close(xf, x.flip(-1))
    # bilinear 2x upsampling preserves the mean of each image up to the border effect
    x8, _ = load_digits_images(8)
    assert abs(float(ds.x.mean()) - float(x8.mean())) < 0.02


# ----------------------------------------------------------------------------------------------
# Latents folder
# ----------------------------------------------------------------------------------------------
def test_latent_dataset_reads_flips_and_skips_unfinished_rows(tmp_path):
    n, c, s = 5, 4, 2
    lat = np.lib.format.open_memmap(tmp_path / "latents.npy", mode="w+", dtype=np.float16, shape=(n, 2, c, s, s))
    for i in range(n):
        lat[i, 0] = i
        lat[i, 1] = -i
    lat.flush()
    np.save(tmp_path / "labels.npy", np.arange(n, dtype=np.int64) % 3)
    np.save(tmp_path / "status.npy", np.array([1, 2, 1, 0, 1], dtype=np.uint8))
    meta = {"complete": True, "num_classes": 3, "image_size": 16, "count": n}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    ds = LatentDataset(str(tmp_path))
    assert len(ds) == 3  # rows 0, 2, 4
    z, y = ds[(1, 0)]
    assert float(z.mean()) == 2.0 and y == 2
    z, y = ds[(2, 1)]
    assert float(z.mean()) == -4.0 and y == 1 and z.dtype == torch.float32
    meta["complete"] = False
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="incomplete"):
        LatentDataset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="extract_latents"):
        LatentDataset(str(tmp_path / "missing"))


def _latents_folder(path, n=6, num_classes=3, **meta):
    path.mkdir(exist_ok=True)
    np.lib.format.open_memmap(path / "latents.npy", mode="w+", dtype=np.float16, shape=(n, 2, 4, 2, 2)).flush()
    np.save(path / "labels.npy", np.arange(n, dtype=np.int64) % num_classes)
    np.save(path / "status.npy", np.ones(n, dtype=np.uint8))
    (path / "meta.json").write_text(json.dumps(dict({"complete": True, "num_classes": num_classes,
                                                      "image_size": 16, "count": n, "done": n}, **meta)))
    return path


@pytest.mark.parametrize("damage,file,message", [
    (lambda p: np.save(p / "labels.npy", np.array([0, 1, 2, 3, 0, 1])), "labels.npy",
     r"labels \[3\] outside \[0, 3\).*null class"),
    (lambda p: np.save(p / "labels.npy", np.array([0, 1, -1, 0, 1, 2])), "labels.npy", r"labels \[-1\]"),
    (lambda p: np.save(p / "status.npy", np.ones(2, dtype=np.uint8)), "status.npy", r"shape \(2,\).*expected \(6,\)"),
    (lambda p: np.save(p / "labels.npy", np.zeros(4, dtype=np.int64)), "labels.npy", r"shape \(4,\)"),
    (lambda p: np.save(p / "status.npy", np.array([1, 1, 1, 1, 1, 7], dtype=np.uint8)), "status.npy", "values \\[7\\]"),
    (lambda p: (p / "latents.npy").write_bytes((p / "latents.npy").read_bytes()[:100]), "latents.npy", "unreadable"),
    (lambda p: np.save(p / "latents.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True), "latents.npy",
     "unreadable"),
    (lambda p: np.save(p / "latents.npy", np.zeros((6, 4, 2, 2), np.float16)), "latents.npy", r"shape \(6, 4, 2, 2\)"),
    (lambda p: os.remove(p / "labels.npy"), "labels.npy", "missing"),
    (lambda p: (p / "meta.json").write_text('{"complete": true, "num_cl'), "meta.json", "not valid JSON"),
])
def test_latent_folder_is_checked_and_errors_name_the_file(tmp_path, damage, file, message):
    """Shapes, label range and completeness are checked before training, each error naming its file
    (labels == num_classes would train the guidance's null class; a short status.npy dropped items)."""
    folder = _latents_folder(tmp_path / "lat")
    assert len(LatentDataset(str(folder))) == 6
    damage(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        LatentDataset(str(folder))
    assert os.path.join(str(folder), file) in str(err.value)


# ----------------------------------------------------------------------------------------------
# Batch order
# ----------------------------------------------------------------------------------------------
def _all_batches(num, micro, ga, world, seed, epoch, start=0, flip=True):
    return [list(RankBatchSampler(num, micro, ga, r, world, seed, epoch, start, flip)) for r in range(world)]


def test_sampler_partitions_each_global_batch():
    num, micro, ga, world = 103, 4, 3, 2
    per_rank = _all_batches(num, micro, ga, world, seed=5, epoch=2)
    perm, flips = epoch_order(num, 5, 2, True)
    steps = num // (micro * ga * world)
    for r in range(world):
        assert len(per_rank[r]) == steps * ga
    seen = []
    for step in range(steps):
        block = set()
        for r in range(world):
            for m in range(ga):
                block.update(k for k, _ in per_rank[r][step * ga + m])
        expected = perm[step * micro * ga * world:(step + 1) * micro * ga * world].tolist()
        assert block == set(expected)  # each step reads exactly its slice of the permutation
        seen += expected
    assert len(seen) == len(set(seen))  # no sample twice in an epoch, across ranks
    for r in range(world):
        for batch in per_rank[r]:
            for k, f in batch:
                pos = (perm == k).nonzero().item()
                assert f == int(flips[pos])


def test_sampler_resume_reads_the_same_tail():
    full = _all_batches(200, 5, 2, 2, seed=0, epoch=1)
    tail = _all_batches(200, 5, 2, 2, seed=0, epoch=1, start=7)
    for r in range(2):
        assert tail[r] == full[r][7 * 2:]


def test_sampler_epochs_differ_and_flip_off():
    a = _all_batches(64, 4, 1, 2, seed=0, epoch=0)
    b = _all_batches(64, 4, 1, 2, seed=0, epoch=1)
    assert a != b
    c = _all_batches(64, 4, 1, 2, seed=0, epoch=0, flip=False)
    assert all(f == 0 for r in c for batch in r for _, f in batch)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        RankBatchSampler(10, 8, 1, 0, 2, 0, 0)


def test_image_folder_dataset_flip_and_corrupt_file(tmp_path):
    from fastdit.training.data import ImageFolderDataset

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a" / "x.png")
    (tmp_path / "b" / "bad.png").write_bytes(b"not a png")
    ds = ImageFolderDataset(str(tmp_path), 8)
    assert len(ds) == 2 and ds.num_classes == 2
    x, y = ds[(0, 0)]
    xf, _ = ds[(0, 1)]
    expected = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(xf, expected.flip(-1))
    assert y == 0
    with pytest.raises(RuntimeError, match="bad.png"):
        ds[(1, 0)]
    (tmp_path / "c").mkdir()  # an empty class folder would be a label without images
    (tmp_path / "c" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"class folder\(s\) c hold no images"):
        ImageFolderDataset(str(tmp_path), 8)


def test_digits_runs_train_on_the_split_the_quality_classifier_never_sees():
    """data.digits_split: "dit" (default) = the 70% the classifier of fastdit.evaluate.digits_quality never
    sees; "all" = the 1797 digits."""
    from fastdit.training.config import config_from_dict
    from fastdit.training.data import build_dataset, digits_split

    raw = json.load(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      "configs", "digits.json")))
    ds = build_dataset(config_from_dict(raw).data)
    _, y = load_digits_images(8)
    assert ds.split == "dit" and len(ds) == 1258 and torch.equal(ds.y, y[digits_split(y, "dit")])
    raw["data"]["digits_split"] = "all"
    assert len(build_dataset(config_from_dict(raw).data)) == 1797

