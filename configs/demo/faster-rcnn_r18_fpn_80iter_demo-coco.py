# Faster R-CNN, ResNet-18 FPN, 80 iterations on mmtune's synthetic demo
# dataset: a whole fine-tuning-style run (frozen stem, BN in eval mode) that
# trains and validates once, printing the COCO bbox mAP, in about 1.5
# minutes on 2 CPU cores. A check that everything runs, not a benchmark.
#
#   python tools/train.py configs/demo/faster-rcnn_r18_fpn_80iter_demo-coco.py
#
# tools/train.py and tools/test.py generate the dataset on first use (the
# `demo_data` key of ../_base_/datasets/demo_coco_detection.py). No weights
# can be downloaded here, so the backbone starts from a random init
# (init_cfg=None) and the mAP stays modest (0.2 to 0.3 at the end).
# RetinaNet's focal loss learns too slowly for so short a schedule: after
# 80 iterations it detects almost nothing.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    '../_base_/datasets/demo_coco_detection.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmtune'], allow_failed_imports=False)

# model: ResNet-18 with the fine-tuning setting that tune mode is for (BN
# layers in eval mode with trainable affine parameters), and narrower
# necks and heads than mmdet's to keep CPU time down.
model = dict(
    backbone=dict(
        depth=18,
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=None,
    ),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=128),
    rpn_head=dict(in_channels=128, feat_channels=128),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=128),
        bbox_head=dict(in_channels=128, num_classes=3),
    ),
    train_cfg=dict(rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=300)),
)

# schedule: 80 iterations, validation at the end only
max_iters = 80
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters
)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10)
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001),
    clip_grad=dict(max_norm=35, norm_type=2),
)
# base_batch_size = (1 process) x (2 samples per process)
auto_scale_lr = dict(enable=False, base_batch_size=2)

# runtime: log often, keep only the final checkpoint (interval=-1 never
# saves on schedule; save_last still saves at the end)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(
        type='CheckpointHook', by_epoch=False, interval=-1, save_last=True
    ),
)
log_processor = dict(by_epoch=False, window_size=10)
randomness = dict(seed=0)
