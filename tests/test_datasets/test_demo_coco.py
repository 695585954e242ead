# Copyright (c) mmtune contributors. All rights reserved.
import json
import os
import os.path as osp

import cv2
import pytest

from mmtune.datasets import (
    DEMO_COCO_CLASSES,
    DEMO_DATA_ENV,
    default_demo_root,
    demo_coco,
    generate_demo_coco,
    prepare_demo_data,
)

# Small and not square, so that a width/height swap shows.
SMALL = dict(num_train=6, num_val=3, img_size=(96, 64))


def _read_tree(root):
    """Every file under ``root`` as ``{relative path: bytes}``."""
    files = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = osp.join(dirpath, name)
            with open(path, 'rb') as f:
                files[osp.relpath(path, root)] = f.read()
    return files


@pytest.fixture(scope='module')
def small_root(tmp_path_factory):
    return generate_demo_coco(
        str(tmp_path_factory.mktemp('demo') / 'coco'), **SMALL
    )


@pytest.mark.parametrize('split,count', [('train', 6), ('val', 3)])
def test_valid_coco(small_root, split, count):
    coco_api = pytest.importorskip('pycocotools.coco')
    ann_file = osp.join(small_root, 'annotations', f'instances_{split}.json')
    coco = coco_api.COCO(ann_file)
    cats = coco.loadCats(coco.getCatIds())
    assert [c['name'] for c in cats] == list(DEMO_COCO_CLASSES)
    assert [c['id'] for c in cats] == [1, 2, 3]
    assert sorted(coco.getImgIds()) == list(range(1, count + 1))
    assert len(set(coco.getAnnIds())) == len(coco.dataset['annotations'])
    width, height = SMALL['img_size']
    for img_info in coco.loadImgs(coco.getImgIds()):
        img = cv2.imread(osp.join(small_root, split, img_info['file_name']))
        assert img.shape == (height, width, 3)
        assert (img_info['width'], img_info['height']) == (width, height)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_info['id']))
        assert 1 <= len(anns) <= 4
        for ann in anns:
            x, y, w, h = ann['bbox']
            assert 0 <= x and 0 <= y and w > 0 and h > 0
            assert x + w <= width and y + h <= height
            assert 0 < ann['area'] <= w * h
            assert ann['iscrowd'] == 0
            assert ann['category_id'] in (1, 2, 3)


def test_objects_are_in_their_boxes(small_root):
    """Each box holds a shape of its class colour."""
    with open(
        osp.join(small_root, 'annotations', 'instances_train.json')
    ) as f:
        coco = json.load(f)
    files = {img['id']: img['file_name'] for img in coco['images']}
    for ann in coco['annotations']:
        img = cv2.imread(
            osp.join(small_root, 'train', files[ann['image_id']])
        )[..., ::-1]
        x, y, w, h = map(int, ann['bbox'])
        colour = demo_coco._COLOURS[ann['category_id'] - 1]
        # The middle half of the row 3/4 down the box is inside every
        # shape: its mean is the class colour, give or take the jitter.
        row = img[y + 3 * h // 4, x + w // 4 : x + w - w // 4].astype(float)
        assert abs(row.mean(0) - colour).max() < 40


def test_deterministic(tmp_path):
    root_a = generate_demo_coco(str(tmp_path / 'a'), seed=3, **SMALL)
    root_b = generate_demo_coco(str(tmp_path / 'b'), seed=3, **SMALL)
    tree_a = _read_tree(root_a)
    assert tree_a == _read_tree(root_b)
    assert len(tree_a) == 6 + 3 + 2 + 1  # images, annotations, stamp
    root_c = generate_demo_coco(str(tmp_path / 'c'), seed=4, **SMALL)
    tree_c = _read_tree(root_c)
    assert tree_c['train/000001.jpg'] != tree_a['train/000001.jpg']


def test_growing_a_split_keeps_its_images(tmp_path):
    small = _read_tree(generate_demo_coco(str(tmp_path / 'a'), **SMALL))
    more = _read_tree(
        generate_demo_coco(
            str(tmp_path / 'b'),
            num_train=8,
            num_val=3,
            img_size=SMALL['img_size'],
        )
    )
    for name, data in small.items():
        if name.endswith('.jpg'):
            assert more[name] == data


def test_reuse_and_regenerate(tmp_path, monkeypatch):
    root = str(tmp_path / 'coco')
    assert generate_demo_coco(root, **SMALL) == root
    stamp = osp.join(root, 'stamp.json')

    # Same arguments: nothing is written again.
    def fail(*args):
        raise AssertionError('the dataset was written again')

    with monkeypatch.context() as m:
        m.setattr(demo_coco, '_write_dataset', fail)
        assert generate_demo_coco(root, **SMALL) == root

    # Other arguments, or a damaged dataset: written again.
    generate_demo_coco(root, seed=1, **SMALL)
    with open(stamp) as f:
        assert json.load(f)['seed'] == 1
    os.remove(osp.join(root, 'val', '000001.jpg'))
    generate_demo_coco(root, seed=1, **SMALL)
    assert osp.isfile(osp.join(root, 'val', '000001.jpg'))
    # Only the dataset and its lock file are left in the parent.
    assert sorted(os.listdir(tmp_path)) == ['.coco.lock', 'coco']


def test_other_folders_are_left_alone(tmp_path):
    (tmp_path / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='no demo dataset'):
        generate_demo_coco(str(tmp_path), **SMALL)
    assert os.listdir(tmp_path) == ['notes.txt']
    # An empty folder is fine.
    (tmp_path / 'empty').mkdir()
    generate_demo_coco(str(tmp_path / 'empty'), **SMALL)


@pytest.mark.parametrize(
    'kwargs',
    [
        dict(num_train=0),
        dict(num_val=1.5),
        dict(seed=-1),
        dict(img_size=(16, 64)),
        dict(img_size=(64,)),
    ],
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match=repr(next(iter(kwargs.values())))):
        generate_demo_coco(str(tmp_path), **kwargs)
    assert not os.listdir(tmp_path)


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv(DEMO_DATA_ENV, str(tmp_path / 'env'))
    assert default_demo_root() == str(tmp_path / 'env')
    monkeypatch.delenv(DEMO_DATA_ENV)
    assert default_demo_root().endswith(osp.join('data', 'cache', 'demo_coco'))


def test_prepare_demo_data(tmp_path, monkeypatch):
    assert prepare_demo_data({}) is None
    assert prepare_demo_data(dict(demo_data=False)) is None
    root = str(tmp_path / 'coco')
    assert prepare_demo_data(dict(demo_data=dict(root=root, **SMALL))) == root
    with pytest.raises(TypeError, match="'yes'"):
        prepare_demo_data(dict(demo_data='yes'))
    # True: the defaults, in the default root.
    monkeypatch.setenv(DEMO_DATA_ENV, str(tmp_path / 'env'))
    monkeypatch.setattr(demo_coco, '_write_dataset', lambda *args: None)
    assert prepare_demo_data(dict(demo_data=True)) == str(tmp_path / 'env')


def test_mmdet_dataset_and_metric(small_root):
    """mmdet's CocoDataset loads it; CocoMetric gives GT boxes mAP 1."""
    pytest.importorskip('mmdet')
    import torch
    from mmdet.datasets import CocoDataset
    from mmdet.evaluation import CocoMetric

    dataset = CocoDataset(
        data_root=small_root,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        metainfo=dict(classes=DEMO_COCO_CLASSES),
        test_mode=True,
        pipeline=[],
    )
    assert len(dataset) == SMALL['num_val']
    assert dataset.metainfo['classes'] == DEMO_COCO_CLASSES

    metric = CocoMetric(
        ann_file=osp.join(small_root, 'annotations', 'instances_val.json'),
        metric='bbox',
    )
    metric.dataset_meta = dataset.metainfo
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        assert osp.isfile(info['img_path'])
        instances = info['instances']
        assert instances
        bboxes = torch.tensor([inst['bbox'] for inst in instances])
        labels = torch.tensor([inst['bbox_label'] for inst in instances])
        metric.process(
            {},
            [
                dict(
                    img_id=info['img_id'],
                    ori_shape=(info['height'], info['width']),
                    pred_instances=dict(
                        bboxes=bboxes,
                        scores=torch.ones(len(instances)),
                        labels=labels,
                    ),
                )
            ],
        )
    results = metric.evaluate(size=len(dataset))
    assert results['coco/bbox_mAP'] == pytest.approx(1.0)
