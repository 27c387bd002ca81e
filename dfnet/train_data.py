"""The training stream: batches of fresh crops and masks that mix many photos, read as a stream.

Batches must mix photos: train-mode BatchNorm removes each batch's mean colour, so single-photo
batches teach one flat fill. Hence a shuffled shard order and a shuffle buffer. Ray Data runs
:class:`TrainingCrops` in ``pipelines/train.py``; without Ray, :class:`CropStream` does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dfnet.data import decode_photo, stable_hash, train_crop, training_mask
from dfnet.masks import load_masks
from dfnet.storage import filesystem_for, iter_rows, split_files

__all__ = ["Batch", "CropStream", "TrainingCrops", "as_batch", "crop_batches", "shuffle_buffer_items"]

#: (images N×3×S×S float in [0, 1], known masks N×1×S×S float, photo ids N int64)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@functools.lru_cache(maxsize=2)
def mask_pool(uri: str) -> np.ndarray:
    """The training mask pool at ``uri`` (local or ``s3://``), read once per process."""
    fs, path = filesystem_for(uri)
    with fs.open_input_file(path) as stream:
        pool = load_masks(stream)["pool"]
    if pool.ndim != 3 or pool.shape[1] != pool.shape[2]:
        raise ValueError(f"mask pool of shape {pool.shape}: expected (count, side, side) masks")
    return pool


def photo_id(key: str) -> int:
    """A photo's id in batches: 63 bits of its key's stable hash (fits int64)."""
    return stable_hash(key) >> 1


@dataclass(frozen=True)
class TrainingCrops:
    """Rows of photos -> ``crops_per_photo`` random crops of each, with a training mask per crop.

    Every crop draws scale, position, flip and mask from a generator seeded by ``draw`` (the
    caller's epoch and pass), the photo and the crop's index: the same draw repeats exactly.
    """

    masks_uri: str
    size: int
    crops_per_photo: int
    max_zoom_out: float

    def crops(self, key: str, data: bytes, draw: Sequence[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(crop S×S×3 uint8, known mask S×S uint8)`` pairs of one stored photo."""
        image = decode_photo(data)  # prepare stores decodable photos only
        pool = mask_pool(self.masks_uri)
        ident = photo_id(key)
        for index in range(self.crops_per_photo):
            rng = np.random.default_rng([*draw, ident, index])
            crop, share = train_crop(image, self.size, rng, self.max_zoom_out)
            yield crop, training_mask(pool, rng, self.size, share).astype(np.uint8)

    def batch(self, keys: Sequence[str], images: Sequence[bytes], draw: Sequence[int]) -> dict[str, np.ndarray]:
        """Column arrays of the crops of ``keys``: ``image`` N×3×S×S and ``mask`` N×1×S×S uint8,
        ``photo`` N int64 (the layout Ray Data hands to the training workers)."""
        crops, masks, ids = [], [], []
        for key, data in zip(keys, images):
            for crop, mask in self.crops(key, data, draw):
                crops.append(crop.transpose(2, 0, 1))
                masks.append(mask[None])
                ids.append(photo_id(key))
        side = self.size
        return {
            "image": np.stack(crops) if crops else np.empty((0, 3, side, side), np.uint8),
            "mask": np.stack(masks) if masks else np.empty((0, 1, side, side), np.uint8),
            "photo": np.asarray(ids, dtype=np.int64),
        }


def as_batch(columns: dict[str, torch.Tensor]) -> Batch:
    """A loop batch from uint8 crop columns (crops travel as bytes: a quarter of float32)."""
    return columns["image"].float().div_(255), columns["mask"].float(), columns["photo"]


def shuffle_buffer_items(buffer_mb: float, size: int) -> int:
    """How many crops of ``size``² (uint8 image and mask) fit a shuffle buffer of ``buffer_mb``."""
    return max(1, int(buffer_mb * 2**20) // (4 * size * size))


class CropStream(IterableDataset):
    """The training split as a stream of single crops, for the plain loop's DataLoader.

    Shard order is seeded per (epoch, pass), workers split the shards, and a seeded buffer
    shuffles across photos; each worker holds one row group and its buffer.
    """

    def __init__(self, data_dir: str, transform: TrainingCrops, buffer_items: int, seed: int) -> None:
        self.data_dir, self.transform, self.buffer_items, self.seed = data_dir, transform, buffer_items, seed
        self.draw: tuple[int, int] = (0, 0)

    def set_draw(self, epoch: int, pass_index: int) -> None:
        """Choose the (epoch, pass) to stream next (call before iterating)."""
        self.draw = (epoch, pass_index)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        draw = (self.seed, *self.draw)
        fs, files = split_files(self.data_dir, "train")
        order = np.random.default_rng(list(draw)).permutation(len(files))
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = [files[i] for i in order[worker::workers]]
        rng = np.random.default_rng([*draw, worker, 1])
        buffer: list[tuple[np.ndarray, np.ndarray, int]] = []
        for rows in iter_rows(fs, mine):
            for key, data in zip(rows.column(0).to_pylist(), rows.column(1).to_pylist()):
                for crop, mask in self.transform.crops(key, data, draw):
                    buffer.append((crop, mask, photo_id(key)))
                    if len(buffer) >= self.buffer_items:
                        yield _item(_pop(buffer, rng))
        rng.shuffle(buffer)  # type: ignore[arg-type]
        for entry in buffer:
            yield _item(entry)


def _pop(buffer: list, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """A random entry of ``buffer``, removed in O(1) (the last one takes its place)."""
    index = int(rng.integers(len(buffer)))
    buffer[index], buffer[-1] = buffer[-1], buffer[index]
    return buffer.pop()


def _item(entry: tuple[np.ndarray, np.ndarray, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    crop, mask, ident = entry
    return torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))), torch.from_numpy(mask[None]), ident


def crop_batches(stream: CropStream, batch_size: int, workers: int) -> Callable[[int, int], Iterable[Batch]]:
    """The plain loop's batch source: ``(epoch, pass) -> that pass's batches`` of ``stream``."""
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=True)

    def batches(epoch: int, pass_index: int) -> Iterator[Batch]:
        stream.set_draw(epoch, pass_index)  # workers copy the dataset when iteration starts
        for images, masks, ids in loader:
            yield as_batch({"image": images, "mask": masks, "photo": ids})

    return batches
