# Copyright (c) mmtune contributors. All rights reserved.
"""Generate mmtune's synthetic demo dataset (COCO format).

The training and test tools already do this for configs with ``demo_data``;
run this to generate it ahead of time or somewhere else::

    python tools/misc/generate_demo_data.py [--root DIR] [--seed 0]
"""

import argparse
import time

from mmtune.datasets import default_demo_root, generate_demo_coco


def parse_args():
    parser = argparse.ArgumentParser(
        description='Generate the synthetic demo dataset in COCO format'
    )
    parser.add_argument(
        '--root',
        help='output folder; defaults to $MMTUNE_DEMO_DATA or '
        f'{default_demo_root()}',
    )
    # Unset options keep generate_demo_coco's defaults.
    parser.add_argument('--seed', type=int, help='random seed (0)')
    parser.add_argument(
        '--num-train', type=int, help='number of training images (64)'
    )
    parser.add_argument(
        '--num-val', type=int, help='number of validation images (16)'
    )
    parser.add_argument(
        '--img-size',
        type=int,
        nargs=2,
        metavar=('WIDTH', 'HEIGHT'),
        help='image size (320 240)',
    )
    return parser.parse_args()


def main():
    args = parse_args()
    start = time.perf_counter()
    kwargs = {k: v for k, v in vars(args).items() if v is not None}
    root = generate_demo_coco(**kwargs)
    print(
        f'demo dataset ready in {root} ({time.perf_counter() - start:.1f} s)'
    )


if __name__ == '__main__':
    main()
