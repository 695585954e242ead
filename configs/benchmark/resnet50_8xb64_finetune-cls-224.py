# ResNet-50 fine-tuned for classification on 224x224 images, 64 per GPU
# (8 GPUs x 64 = ImageNet's usual 512), the backbone's BN frozen
# (norm_eval=True) as in fine-tuning: the setting of the tune-mode paper's
# classification experiments. For the benchmark of
# tools/analysis_tools/benchmark_fast_conv_bn_eval.py only: there is no
# dataset, the tool feeds random images and labels of `synthetic_input`'s
# size (the dataloader's batch size: 64 per GPU).
#
# mmpretrain is not a dependency of mmtune, so the model is mmtune's
# SimpleImageClassifier (backbone, global average pool, linear head,
# cross-entropy) around mmdet's ResNet. The scope is mmdet's, as in the
# detector configs (its registries hold the weight initialisers); the
# classifier's type names mmtune's.
default_scope = 'mmdet'
custom_imports = dict(
    imports=['mmtune.models', 'mmdet.models'], allow_failed_imports=False
)

model = dict(
    type='mmtune.SimpleImageClassifier',
    backbone=dict(
        type='mmdet.ResNet',
        depth=50,
        num_stages=4,
        out_indices=(3,),
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=None,  # no weights to download here
    ),
    in_channels=2048,
    num_classes=1000,
    data_preprocessor=dict(
        type='mmengine.ImgDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
    ),
)

# (height, width) of the synthetic images
synthetic_input = dict(img_size=(224, 224))
train_dataloader = dict(batch_size=64, num_workers=8, dataset=None)

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001),
)
