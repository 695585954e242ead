# mmtune's synthetic demo dataset (mmtune/datasets/demo_coco.py) in COCO
# format: 64 training and 16 validation images of 320x240 with coloured
# squares, circles and triangles.
#
# `demo_data` asks tools/train.py and tools/test.py to generate the dataset
# in `data_root` before they build the runner: a few seconds the first time,
# then reused (a stamp records the arguments). Its keys are the arguments of
# mmtune.datasets.generate_demo_coco. The root is relative to the working
# directory, like every mmdet data_root: run the tools from the repository
# root, or set $MMTUNE_DEMO_DATA to put the dataset elsewhere.
dataset_type = 'CocoDataset'
data_root = '{{$MMTUNE_DEMO_DATA:data/cache/demo_coco}}/'
demo_data = dict(
    root=data_root, num_train=64, num_val=16, seed=0, img_size=(320, 240)
)
metainfo = dict(
    classes=('square', 'circle', 'triangle'),
    palette=[(220, 50, 50), (40, 190, 60), (50, 90, 230)],
)
backend_args = None

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(320, 240), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(320, 240), keep_ratio=True),
    # If you don't have a gt annotation, delete the pipeline
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=(
            'img_id',
            'img_path',
            'ori_shape',
            'img_shape',
            'scale_factor',
        ),
    ),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        pipeline=train_pipeline,
        backend_args=backend_args,
    ),
)
val_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args,
    ),
)
test_dataloader = val_dataloader

val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val.json',
    metric='bbox',
    format_only=False,
    backend_args=backend_args,
)
test_evaluator = val_evaluator
