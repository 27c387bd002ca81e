"""The training stream: shuffled batches that mix many photos, with fresh crops and masks.

A batch of crops from one photo would be fatal for DFNet: train-mode BatchNorm removes each
batch's mean colour and brightness, so a network fed single-photo batches cannot see colours and
learns one flat fill. Here every epoch is one pass over ``crops_per_photo`` items per training
photo in a fresh order (a seeded shuffle per epoch, split across workers by rank), and every item
draws its own crop (scale, position, flip) and mask from a generator seeded by
``(seed, epoch, item)``: reproducible, different every epoch, the same on any number of loader
processes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dfnet.data import decode_photo, read_split, train_crop, training_mask

__all__ = ["PhotoCrops", "set_epoch", "training_loader"]


class PhotoCrops(Dataset):
    """Item ``i`` = a random crop of photo ``i % photos`` and a pool mask cut at the crop's scale.

    Returns ``(image 3×S×S float in [0, 1], known mask 1×S×S float, photo index)``.
    """

    def __init__(
        self,
        photos: list[bytes],
        mask_pool: np.ndarray,
        size: int,
        crops_per_photo: int = 1,
        seed: int = 0,
        max_zoom_out: float = 4.0,
        cache_mb: int = 2048,
    ) -> None:
        if not photos:
            raise ValueError("no training photos: run the prepare stage (is the train split empty?)")
        if mask_pool.ndim != 3 or mask_pool.shape[1] != mask_pool.shape[2]:
            raise ValueError(f"mask pool of shape {mask_pool.shape}: expected (count, side, side) masks")
        self.photos = photos
        self.mask_pool = mask_pool
        self.size = size
        self.crops_per_photo = crops_per_photo
        self.seed = seed
        self.max_zoom_out = max_zoom_out
        self.epoch = 0
        # Decoding a stored 512 px JPEG costs more than the crop, the mask and the copy together,
        # so decoded photos are kept, up to a budget (a corpus of 360 photos takes ~500 MB).
        self.cache_bytes = cache_mb * 2**20
        self._decoded: dict[int, np.ndarray] = {}
        self._cached_bytes = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's crops and masks (call before iterating; loaders copy the dataset)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.photos) * self.crops_per_photo

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        photo = index % len(self.photos)
        image = self._photo(photo)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        crop, share = train_crop(image, self.size, rng, self.max_zoom_out)
        mask = training_mask(self.mask_pool, rng, self.size, share)
        image_t = torch.from_numpy(crop).permute(2, 0, 1).float().div(255)
        return image_t, torch.from_numpy(mask)[None], photo

    def _photo(self, photo: int) -> np.ndarray:
        if photo in self._decoded:
            return self._decoded[photo]
        image = decode_photo(self.photos[photo])  # prepare stores decodable photos only
        if self._cached_bytes + image.nbytes <= self.cache_bytes:
            self._decoded[photo] = image
            self._cached_bytes += image.nbytes
        return image


def training_loader(
    data_dir: str,
    mask_pool: np.ndarray,
    size: int,
    batch_size: int,
    *,
    crops_per_photo: int = 1,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    max_zoom_out: float = 4.0,
) -> DataLoader:
    """Batches of the training split for worker ``rank`` of ``world``.

    The sampler is a ``DistributedSampler`` in every case (one replica when training alone):
    it shuffles the whole epoch with ``seed + epoch`` and gives each rank a disjoint share.
    Call :func:`set_epoch` with the epoch before iterating.
    """
    table = read_split(data_dir, "train")
    dataset = PhotoCrops(table.column("image").to_pylist(), mask_pool, size, crops_per_photo, seed, max_zoom_out)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        persistent_workers=False,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle ``loader`` and redraw its crops and masks for ``epoch``."""
    loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
    loader.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
