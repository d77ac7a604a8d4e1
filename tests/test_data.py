"""Training images: metadata checks, full-precision 16-bit reading, the (3, R, R) tensors SD's VAE expects, and the
cached posterior sampling that must match diffusers' own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_finetune.core.errors import UserError
from ldm_finetune.core.io import load_image
from ldm_finetune.data.caches import sample_latents
from ldm_finetune.data.images import CaptionedImages, to_pixel_values
from ldm_finetune.data.records import read_records
from ldm_finetune.evaluation.metrics import resize_set


def write_folder(folder, rows, images=True):
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if images and "file_name" in row:
            Image.fromarray(np.full((40, 48), 100, np.uint8)).save(folder / row["file_name"])
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_sixteen_bit_slices_keep_their_precision(tmp_path):
    ramp = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "s.png")
    img = load_image(tmp_path / "s.png")
    assert img.dtype == np.float32 and len(np.unique(img)) == 4096  # 8 bits would leave 256 levels
    np.testing.assert_allclose(img, ramp / 65535.0, atol=1e-7)


def test_shrinking_bins_pixels_as_the_evaluation_does():
    # the model must learn the slices the evaluation compares it with; bicubic's lobes overshoot a sharp edge
    edge = np.full((64, 64), 0.25, np.float32)
    edge[:, 33:] = 0.75
    shrunk = (to_pixel_values(edge, 32, rgb=False)[0].numpy() + 1) / 2
    assert 0.25 - 1e-6 <= shrunk.min() and shrunk.max() <= 0.75 + 1e-6
    np.testing.assert_allclose(shrunk, resize_set(edge[None], 32)[0], atol=1e-6)


def test_pixel_values_are_square_rgb_in_minus_one_one():
    grey = np.linspace(0, 1, 40 * 60, dtype=np.float32).reshape(40, 60)
    t = to_pixel_values(grey, 32)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32
    assert torch.equal(t[0], t[1]) and -1 <= t.min() and t.max() <= 1
    flipped = to_pixel_values(grey, 32, flip=True)
    assert torch.allclose(flipped, t.flip(-1))


@pytest.mark.parametrize("rows, message", [
    ([{"file_name": "a.png"}], "no caption column 'text'"),
    ([{"text": "x"}], "no 'file_name'"),
    ([], "lists no images"),
])
def test_bad_metadata(tmp_path, rows, message):
    with pytest.raises(UserError, match=message):
        read_records(write_folder(tmp_path / "d", rows))


def test_caption_column_suggestion_and_missing_images(tmp_path):
    folder = write_folder(tmp_path / "d", [{"file_name": "a.png", "caption": "x"}])
    with pytest.raises(UserError, match="did you mean 'caption'"):
        read_records(folder, "captoin")
    assert read_records(folder, "caption")[0].caption == "x"
    (folder / "a.png").unlink()
    with pytest.raises(UserError, match="1 images in .* are missing"):
        read_records(folder, "caption")


def test_repeats_and_cached_items(tmp_path):
    folder = write_folder(tmp_path / "d", [{"file_name": f"{i}.png", "text": f"c{i}"} for i in range(3)])
    ds = CaptionedImages(read_records(folder), 32, repeats=2, load_pixels=False)
    assert len(ds) == 6 and ds[4] == {"index": 1, "caption": "c1"}


def test_sampling_cached_moments_matches_diffusers_posterior():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = torch.randn(2, 8, 4, 4)
    torch.manual_seed(0)
    expected = DiagonalGaussianDistribution(moments).sample() * 0.18215
    torch.manual_seed(0)
    assert torch.allclose(sample_latents(moments, 0.18215), expected)
