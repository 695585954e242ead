# Copyright (c) mmtune contributors. All rights reserved.
"""A small synthetic detection dataset in COCO format, made on demand.

The demo configs train on it so that they run anywhere in a few minutes,
with no download: coloured squares, circles and triangles on a noisy
background, written as ``train/*.jpg``, ``val/*.jpg`` and
``annotations/instances_{train,val}.json`` under one root.

Every image is drawn from its own random stream seeded with
``(seed, split, index)``, so the same arguments always give byte-identical
files, and growing a split keeps the images it had. A stamp file records the
arguments: a second call with the same ones returns at once.

Needs numpy and OpenCV only (no mmengine, no mmdet).
"""

import contextlib
import json
import os
import os.path as osp
import shutil
import tempfile
from typing import Iterator, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

try:
    import fcntl
except ImportError:  # not on Windows: the atomic rename alone protects it
    fcntl = None

from mmtune.utils import options_switch

#: Class names in category-id order (ids start at 1, as in COCO).
DEMO_COCO_CLASSES = ('square', 'circle', 'triangle')
#: Environment variable that overrides the default root.
DEMO_DATA_ENV = 'MMTUNE_DEMO_DATA'

# RGB colour of each class; every object gets a jittered copy of it.
_COLOURS = ((220, 50, 50), (40, 190, 60), (50, 90, 230))
# Bump whenever the same arguments start giving other files: old stamps then
# no longer match and the data is regenerated.
_FORMAT_VERSION = 1
_STAMP = 'stamp.json'
_SPLITS = ('train', 'val')
_MAX_OBJECTS = 4
_JPEG_QUALITY = 90


def default_demo_root() -> str:
    """Where the demo dataset goes when no root is given.

    ``$MMTUNE_DEMO_DATA`` if set, else ``data/cache/demo_coco`` in the
    mmtune source checkout (git-ignored there), else in the current
    directory for an installed mmtune.

    Returns:
        str: The default root.
    """
    env = os.environ.get(DEMO_DATA_ENV)
    if env:
        return env
    repo = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    is_checkout = osp.isfile(osp.join(repo, 'setup.py')) and osp.isdir(
        osp.join(repo, 'configs')
    )
    base = repo if is_checkout else os.getcwd()
    return osp.join(base, 'data', 'cache', 'demo_coco')


def generate_demo_coco(
    root: Optional[str] = None,
    num_train: int = 64,
    num_val: int = 16,
    seed: int = 0,
    img_size: Sequence[int] = (320, 240),
) -> str:
    """Write the demo COCO dataset, or reuse it if it is already there.

    Layout under ``root``::

        annotations/instances_train.json
        annotations/instances_val.json
        train/000001.jpg ...
        val/000001.jpg ...
        stamp.json

    Each image holds 1 to 4 non-overlapping objects of the classes
    :data:`DEMO_COCO_CLASSES` (category ids 1, 2, 3). Boxes are the tight
    ``[x, y, w, h]`` boxes of the drawn pixels and ``area`` is their pixel
    count; ``iscrowd`` is 0. Image and annotation ids start at 1 in each
    split.

    The dataset is written to a temporary folder and renamed into place, so
    an interrupted run leaves no half dataset, and concurrent calls (one per
    rank of a distributed job) are serialised by a lock file next to
    ``root``. An outdated dataset is replaced; a non-empty folder that is
    not a demo dataset is left alone (``FileExistsError``).

    Args:
        root (str, optional): Where to write it. Defaults to
            :func:`default_demo_root`.
        num_train (int): Number of training images. Defaults to 64.
        num_val (int): Number of validation images. Defaults to 16.
        seed (int): Non-negative random seed. Defaults to 0.
        img_size (Sequence[int]): Image ``(width, height)``, each at least
            32. Defaults to ``(320, 240)``.

    Returns:
        str: The absolute path of ``root``.
    """
    params = _check_params(num_train, num_val, seed, img_size)
    root = osp.abspath(osp.expanduser(root or default_demo_root()))
    if _is_current(root, params):
        return root
    parent = osp.dirname(root)
    os.makedirs(parent, exist_ok=True)
    with _lock(osp.join(parent, f'.{osp.basename(root)}.lock')):
        if _is_current(root, params):  # made by another process meanwhile
            return root
        if (
            osp.lexists(root)
            and os.listdir(root)
            and not osp.isfile(osp.join(root, _STAMP))
        ):
            raise FileExistsError(
                f'{root!r} is not empty and holds no demo dataset (no '
                f'{_STAMP}): refusing to replace it, choose another root'
            )
        tmp = tempfile.mkdtemp(prefix=f'.{osp.basename(root)}.', dir=parent)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            _write_dataset(tmp, params)
            if osp.lexists(root):
                shutil.rmtree(root)
            os.rename(tmp, root)
        finally:
            if osp.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return root


def prepare_demo_data(cfg: Mapping) -> Optional[str]:
    """Generate the demo dataset that a config asks for, if it asks.

    A config asks with a ``demo_data`` key: ``True`` for the defaults of
    :func:`generate_demo_coco`, or a dict of its arguments (normally with
    ``root`` equal to the config's ``data_root``). ``tools/train.py`` and
    ``tools/test.py`` call this before building the runner.

    Args:
        cfg (Mapping): The config (an mmengine ``Config`` or a dict).

    Returns:
        str, optional: The dataset root, or None if the config has no
        ``demo_data`` (or it is False).
    """
    demo = options_switch(
        cfg.get('demo_data'),
        'demo_data',
        'dict(num_train=64, num_val=16) (generate_demo_coco arguments)',
    )
    if demo is None:
        return None
    return generate_demo_coco(**demo)


def _check_params(num_train, num_val, seed, img_size) -> dict:
    """Check the arguments and return them as the stamp's ``params``."""
    for name, value in (('num_train', num_train), ('num_val', num_val)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(
                f'{name} must be a positive int, but got {value!r}'
            )
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f'seed must be a non-negative int, but got {seed!r}')
    if (
        not isinstance(img_size, Sequence)
        or len(img_size) != 2
        or not all(isinstance(s, int) and s >= 32 for s in img_size)
    ):
        raise ValueError(
            'img_size must be (width, height), two ints >= 32, '
            f'but got {img_size!r}'
        )
    return dict(
        format_version=_FORMAT_VERSION,
        num_train=num_train,
        num_val=num_val,
        seed=seed,
        img_size=list(img_size),
    )


def _is_current(root: str, params: dict) -> bool:
    """Whether ``root`` holds a complete dataset made with ``params``."""
    try:
        with open(osp.join(root, _STAMP)) as f:
            if json.load(f) != params:
                return False
        counts = (params['num_train'], params['num_val'])
        for split, count in zip(_SPLITS, counts):
            ann = osp.join(root, 'annotations', f'instances_{split}.json')
            if (
                not osp.isfile(ann)
                or len(os.listdir(osp.join(root, split))) != count
            ):
                return False
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def _lock(path: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a no-op without ``fcntl``)."""
    if fcntl is None:
        yield
        return
    with open(path, 'w') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_dataset(root: str, params: dict) -> None:
    """Write every image, both annotation files and, last, the stamp."""
    width, height = params['img_size']
    categories = [
        dict(id=i + 1, name=name, supercategory='shape')
        for i, name in enumerate(DEMO_COCO_CLASSES)
    ]
    os.makedirs(osp.join(root, 'annotations'))
    counts = (params['num_train'], params['num_val'])
    for split_idx, (split, count) in enumerate(zip(_SPLITS, counts)):
        os.makedirs(osp.join(root, split))
        images, annotations = [], []
        for img_idx in range(count):
            rng = np.random.default_rng([params['seed'], split_idx, img_idx])
            img, objects = _draw_image(rng, width, height)
            img_id = img_idx + 1
            file_name = f'{img_id:06d}.jpg'
            ok, buf = cv2.imencode(
                '.jpg',
                img[..., ::-1],
                [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY],
            )
            if not ok:
                raise RuntimeError(f'OpenCV could not encode {file_name}')
            with open(osp.join(root, split, file_name), 'wb') as f:
                f.write(buf.tobytes())
            images.append(
                dict(
                    id=img_id, file_name=file_name, width=width, height=height
                )
            )
            for label, bbox, area in objects:
                annotations.append(
                    dict(
                        id=len(annotations) + 1,
                        image_id=img_id,
                        category_id=label + 1,
                        bbox=bbox,
                        area=area,
                        iscrowd=0,
                    )
                )
        coco = dict(
            info=dict(
                description='mmtune synthetic demo dataset (shapes)',
                version=str(_FORMAT_VERSION),
            ),
            licenses=[],
            images=images,
            annotations=annotations,
            categories=categories,
        )
        ann_file = osp.join(root, 'annotations', f'instances_{split}.json')
        with open(ann_file, 'w') as f:
            json.dump(coco, f)
    with open(osp.join(root, _STAMP), 'w') as f:
        json.dump(params, f, indent=2)


def _draw_image(
    rng: np.random.Generator, width: int, height: int
) -> Tuple[np.ndarray, List[tuple]]:
    """Draw one RGB image.

    Returns:
        tuple: The ``(height, width, 3)`` uint8 image and its objects as
        ``(label, [x, y, w, h], area)`` tuples.
    """
    # Background: a random colour, a random linear gradient, noise (added
    # at the end so that it covers the objects too).
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    img = (
        rng.uniform(70, 170, size=3)
        + (xs / width - 0.5)[..., None] * rng.uniform(-60, 60, size=3)
        + (ys / height - 0.5)[..., None] * rng.uniform(-60, 60, size=3)
    )
    min_side = min(width, height)
    placed: List[Tuple[int, int, int]] = []
    objects = []
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        label = int(rng.integers(len(DEMO_COCO_CLASSES)))
        for _try in range(20):
            size = int(rng.integers(min_side * 0.15, min_side * 0.45 + 1))
            x0 = int(rng.integers(0, width - size + 1))
            y0 = int(rng.integers(0, height - size + 1))
            if not any(_overlap(x0, y0, size, *p) for p in placed):
                break
        else:  # no free space left for this object: skip it
            continue
        placed.append((x0, y0, size))
        mask = np.zeros((height, width), np.uint8)
        _draw_shape(mask, label, x0, y0, size, rng)
        obj_ys, obj_xs = np.nonzero(mask)
        x1, y1 = int(obj_xs.min()), int(obj_ys.min())
        box_w = int(obj_xs.max()) - x1 + 1
        box_h = int(obj_ys.max()) - y1 + 1
        colour = np.asarray(_COLOURS[label]) + rng.integers(-25, 26, size=3)
        img[mask > 0] = colour
        objects.append(
            (
                label,
                [float(x1), float(y1), float(box_w), float(box_h)],
                float(obj_xs.size),
            )
        )
    img += rng.normal(0, 10, size=img.shape)
    return np.clip(img.round(), 0, 255).astype(np.uint8), objects


def _overlap(
    x0: int, y0: int, size: int, px: int, py: int, psize: int, margin: int = 4
) -> bool:
    """Whether two squares come closer than ``margin`` pixels."""
    return (
        x0 < px + psize + margin
        and px < x0 + size + margin
        and y0 < py + psize + margin
        and py < y0 + size + margin
    )


def _draw_shape(
    mask: np.ndarray,
    label: int,
    x0: int,
    y0: int,
    size: int,
    rng: np.random.Generator,
) -> None:
    """Set to 1 the pixels of one shape inside the square at ``(x0, y0)``."""
    name = DEMO_COCO_CLASSES[label]
    if name == 'square':
        mask[y0 : y0 + size, x0 : x0 + size] = 1
    elif name == 'circle':
        radius = (size - 1) // 2
        cv2.circle(mask, (x0 + radius, y0 + radius), radius, 1, -1)
    else:  # triangle: a random apex on the top side, the base at the bottom
        apex = x0 + int(rng.integers(0, size))
        points = np.array(
            [[apex, y0], [x0, y0 + size - 1], [x0 + size - 1, y0 + size - 1]],
            dtype=np.int32,
        )
        cv2.fillPoly(mask, [points], 1)
