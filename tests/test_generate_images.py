"""fastdit.generate.images and fastdit.generate.vae: the one uint8 rounding, grids, decoding through a VAE."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.generate.images import decode_images, make_grid, save_class_grid, to_rgb, to_uint8
from fastdit.generate.vae import load_vae


def test_to_uint8_and_grid():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 6)
    np.testing.assert_array_equal(to_uint8(x)[0, 0, :, 0], [0, 0, 128, 191, 255, 255])
    imgs = np.arange(5 * 2 * 3 * 1, dtype=np.uint8).reshape(5, 2, 3, 1)
    grid = make_grid(imgs, nrow=2, padding=1, upscale=2)
    assert grid.shape == (3 * (4 + 1) + 1, 2 * (6 + 1) + 1, 1)
    np.testing.assert_array_equal(grid[1:5, 8:14, 0], imgs[1, :, :, 0].repeat(2, 0).repeat(2, 1))
    assert (grid[11:15, 8:14] == 0).all()  # the empty sixth cell


def test_vae_decoding_from_a_local_folder(tmp_path):
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                        layers_per_block=1, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(str(tmp_path / "vae"))
    z = torch.randn(3, 4, 4, 4)
    images = decode_images(z, loaded, latent_scale=0.5, batch_size=2)
    with torch.no_grad():
        want = to_uint8(vae.eval().decode(z / 0.5).sample)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, want)
    with pytest.raises(FileNotFoundError, match="--vae"):
        load_vae(str(tmp_path / "missing"))


def test_class_grid_rows_labels_and_grey_to_rgb(tmp_path):
    imgs = np.stack([np.full((4, 4, 1), 40 * k, dtype=np.uint8) for k in range(6)])  # 6 grey images
    assert to_rgb(imgs).shape == (6, 4, 4, 3) and (to_rgb(imgs)[..., 0] == to_rgb(imgs)[..., 2]).all()
    path = save_class_grid(imgs, 2, str(tmp_path / "g.png"), row_labels=["a", "b"], min_cell=8)
    grid = np.asarray(Image.open(path))
    # 2 rows x 3 cells of 8 px (zoom 2), 2 px padding, a 40 px label column, white background
    assert grid.shape == (2 * (8 + 2) + 2, 40 + 3 * (8 + 2) + 2, 3)
    assert (grid[2:10, 42:50] == 0).all() and (grid[12:20, 62:70] == 200).all()
    with pytest.raises(ValueError, match="do not fill 4 rows"):
        save_class_grid(imgs, 4, str(tmp_path / "h.png"))
    with pytest.raises(ValueError, match="2 channels"):
        to_rgb(np.zeros((1, 4, 4, 2), dtype=np.uint8))
