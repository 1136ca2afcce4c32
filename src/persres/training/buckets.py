"""Aspect-ratio buckets (setting `buckets`, off by default): photos keep their shape instead of being
cropped to a square.

As kohya sd-scripts does it (``library/model_util.make_bucket_resolutions`` and
``train_util.BucketManager.select_bucket``): buckets of about ``resolution``² pixels whose sides are
multiples of ``step`` (64 for a VAE that downsamples by 8: latents whose sides are multiples of 8, as
every denoiser persres trains needs), between half and twice ``resolution`` (kohya's 256-1024 at 512);
each photo goes to the bucket nearest its aspect ratio (nearest in log ratio, so 1:2 and 2:1 are alike
far from 1:1; kohya compares plain ratios). Each training image is a random window of its bucket's
shape covering at least ``min_crop`` of the largest such window in the photo (at ``min_crop`` 1, the
photo cropped only as far as its bucket's ratio needs), resized to the bucket, and flipped as the square
path does, with the same four draws per image.

A batch is of one bucket: its first photo is drawn from all photos, the others from that photo's bucket
(with replacement, as the square path draws). Each photo is thus drawn as often as without buckets;
a photo alone in its bucket fills its batch with differently cropped copies of itself. Every draw comes
from the run's generator, so a resumed run draws what an uninterrupted one does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from persres.errors import ConfigError
from persres.training.data import Draws, augment_draws, flipped

Size = tuple[int, int]  # (height, width) in pixels


def bucket_sizes(resolution: int, step: int) -> list[Size]:
    """The buckets: about ``resolution``² pixels, sides multiples of ``step`` in [resolution / 2,
    2 resolution] (rounded to ``step``), the square one included; sorted."""
    if resolution < step:
        raise ConfigError(
            f"`buckets` needs a `resolution` of at least {step} for this base (bucket sides are multiples "
            f"of {step} px), got {resolution}; raise `resolution` or turn `buckets` off"
        )
    area = resolution * resolution
    side = math.isqrt(area) // step * step
    sizes = {(side, side)}
    low = max(step, math.ceil(resolution / 2 / step) * step)
    high = max(low, 2 * resolution // step * step)
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            sizes.update({(height, width), (width, height)})
    return sorted(sizes)


def nearest_bucket(height: int, width: int, sizes: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest ``width / height`` (in log ratio; the first on a tie)."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda size: abs(math.log(size[1] / size[0]) - ratio))


@dataclass(frozen=True)
class Buckets:
    """Each photo's bucket, and the photos of each bucket."""

    of_photo: list[Size]  # per photo, (height, width)
    members: dict[Size, list[int]]  # bucket -> its photos' indices, ascending

    @classmethod
    def assign(cls, shapes: list[Size], resolution: int, step: int) -> Buckets:
        """``shapes``: each photo's (height, width) (any scale: only the ratio counts)."""
        sizes = bucket_sizes(resolution, step)
        of_photo = [nearest_bucket(h, w, sizes) for h, w in shapes]
        members: dict[Size, list[int]] = {}
        for index, size in enumerate(of_photo):
            members.setdefault(size, []).append(index)
        return cls(of_photo, members)

    def picks(self, size: int, generator: torch.Generator) -> list[int]:
        """``size`` photos of one bucket: the first drawn from all photos, the rest from its bucket."""
        first = int(torch.randint(len(self.of_photo), (1,), generator=generator))
        members = self.members[self.of_photo[first]]
        rest = torch.randint(len(members), (size - 1,), generator=generator).tolist()
        return [first, *(members[i] for i in rest)]

    def batch(
        self,
        tensors: list[torch.Tensor],
        size: int,
        generator: torch.Generator,
        min_crop: float,
        flip: bool,
    ) -> tuple[torch.Tensor, list[int]]:
        """(size, 3, H, W) of one bucket (H, W), and the photo each image came from."""
        images, _, picks = self.batch_masked(tensors, None, size, generator, min_crop, flip)
        return images, picks

    def batch_masked(
        self,
        tensors: list[torch.Tensor],
        masks: list[torch.Tensor] | None,
        size: int,
        generator: torch.Generator,
        min_crop: float,
        flip: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """``batch``, and each image's mask (size, 1, H, W) windowed with its photo's draws (None without)."""
        picks = self.picks(size, generator)
        bucket = self.of_photo[picks[0]]
        images, windows = [], []
        for i in picks:
            draws = augment_draws(generator)
            images.append(window_at(tensors[i], bucket, draws, min_crop, flip))
            if masks is not None:
                windows.append(window_at(masks[i], bucket, draws, min_crop, flip))
        return torch.stack(images), torch.stack(windows) if windows else None, picks

    def choose(self, size: int, generator: torch.Generator, flip: bool) -> tuple[list[int], list[bool]]:
        """``batch``'s photos and whether each is flipped, from the very draws ``batch`` makes, without
        the images: the choice of a batch of fixed windows (cached latents, ``latent_cache.py``)."""
        picks = self.picks(size, generator)
        return picks, [flipped(augment_draws(generator), flip) for _ in picks]


def window_at(image: torch.Tensor, bucket: Size, draws: Draws, min_crop: float, flip: bool) -> torch.Tensor:
    """(C, h, w) of the bucket's shape from ``image`` (C, H, W): the window of the bucket's ratio covering at
    least ``min_crop`` of the largest one that ``draws`` place (``CENTRED``: the largest, centred, as cached
    latents take), resized to the bucket, maybe flipped; of any channels (a photo's mask, with its photo's
    draws)."""
    _, height, width = image.shape
    target_h, target_w = bucket
    if width * target_h >= height * target_w:  # the photo is wider than its bucket: the window is as tall
        largest_h, largest_w = height, height * target_w / target_h
    else:
        largest_h, largest_w = width * target_h / target_w, width
    scale = min_crop + (1.0 - min_crop) * draws[0]
    crop_h = min(height, max(1, round(largest_h * scale)))
    crop_w = min(width, max(1, round(largest_w * scale)))
    top = int(draws[1] * (height - crop_h + 1))
    left = int(draws[2] * (width - crop_w + 1))
    crop = image[:, top : top + crop_h, left : left + crop_w]
    if (crop_h, crop_w) != bucket:
        crop = F.interpolate(crop[None], size=bucket, mode="bilinear", antialias=True, align_corners=False)[
            0
        ]  # (C, h, w)
    if flipped(draws, flip):
        crop = crop.flip(-1)
    return crop
