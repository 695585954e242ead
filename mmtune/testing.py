# Copyright (c) mmtune contributors. All rights reserved.
"""Helpers to check tune mode against eval mode (torch only).

Used by mmtune's tests and by ``tools/analysis_tools/
check_fast_conv_bn_eval.py``; usable on any model.
"""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial running statistics and affine values.

    With default statistics (mean 0, var 1, gamma 1, beta 0) almost any
    folding bug goes unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not isinstance(module, _BatchNorm):
            continue
        n = module.num_features
        if module.running_mean is not None:
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
        if module.weight is not None:
            module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.copy_(torch.randn(n, generator=gen) * 0.5)


@torch.no_grad()
def randomize_model(
    model: nn.Module, seed: int = 0, std: float = 0.5
) -> nn.Module:
    """``model`` with every parameter drawn from N(0, ``std``), then
    :func:`randomize_bn`, in float64 and eval mode (returned)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    randomize_bn(model, seed)
    return model.double().eval()


def find_conv_bn_pairs_at_runtime(
    model: nn.Module, *args, forward: Optional[Callable] = None, **kwargs
) -> List[Tuple[str, str]]:
    """Run ``model(*args, **kwargs)`` (or ``forward(*args, **kwargs)``) and
    list the ``(conv, bn)`` pairs of ``model`` where a BN received exactly
    the tensor that a conv returned.

    Returns:
        list[tuple[str, str]]: Qualified names, in call order.
    """
    produced: Dict[int, Tuple[nn.Module, Tensor]] = {}
    pairs: List[Tuple[str, str]] = []
    handles = []
    # a module shared by several parents has several names: a conv is
    # named as the one in the BN's parent when it is there
    all_names: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        all_names.setdefault(id(module), []).append(name)

    def conv_name(conv: nn.Module, bn_name: str) -> str:
        names = all_names[id(conv)]
        parent = bn_name.rpartition('.')[0]
        same = [n for n in names if n.rpartition('.')[0] == parent]
        return (same or names)[0]

    def conv_hook(module, inputs, output):
        if isinstance(output, Tensor):
            produced[id(output)] = (module, output)

    def bn_hook(name):
        def hook(module, inputs):
            if inputs and isinstance(inputs[0], Tensor):
                found = produced.get(id(inputs[0]))
                if found is not None and found[1] is inputs[0]:
                    pairs.append((conv_name(found[0], name), name))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, _ConvNd):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, _BatchNorm):
            handles.append(module.register_forward_pre_hook(bn_hook(name)))
    try:
        with torch.no_grad():
            (forward or model)(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return pairs


def _flatten(out: Any) -> List[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _flatten(item)]
    return []


def forward_backward(
    model: nn.Module,
    inputs: Sequence[Tensor],
    loss_fn: Optional[Callable] = None,
) -> Tuple[List[Tensor], Dict[str, Tensor], List]:
    """Outputs, parameter gradients and input gradients of one pass.

    The loss is the sum of ``(out * w).sum()`` over all outputs with fixed
    pseudo-random weights ``w``, so every output element matters.
    """
    model.zero_grad(set_to_none=True)
    inputs = [
        x.detach().clone().requires_grad_(x.is_floating_point())
        for x in inputs
    ]
    outs = _flatten(model(*inputs))
    if loss_fn is None:
        loss = sum(
            (o.float() * _probe_like(o)).sum()
            for o in outs
            if o.is_floating_point()
        )
    else:
        loss = loss_fn(outs)
    loss.backward()
    grads = {
        name: p.grad.detach().clone()
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    input_grads = [x.grad for x in inputs]
    return [o.detach() for o in outs], grads, input_grads


def _probe_like(t: Tensor) -> Tensor:
    gen = torch.Generator().manual_seed(t.numel() % 9973)
    return torch.randn(t.shape, generator=gen).to(t.device, torch.float32)


def fold_batches(model: nn.Module) -> list:
    """The :class:`~mmtune.rewrite.fold_batch.FoldBatch` objects that the
    tune-mode pairs of ``model`` fold in (empty when batching is off)."""
    from mmtune.rewrite.tune_mode import tune_pairs

    found = []
    for pair in tune_pairs(model):
        batch = pair.batch
        if batch is not None and all(batch is not b for b in found):
            found.append(batch)
    return found


class count_batch_norm_calls(torch.overrides.TorchFunctionMode):
    """Counts the calls of ``F.batch_norm`` inside the ``with`` block
    (``.calls``): a converted pair that folds runs none."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.batch_norm, torch.batch_norm):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def max_relative_error(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max(max|b|, tiny)`` in float64."""
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp_min(1e-12)
    return ((a - b).abs().max() / scale).item()


def compare_models(
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Sequence[Tensor],
    rtol: float,
    loss_fn: Optional[Callable] = None,
) -> List[str]:
    """Compare outputs, all parameter gradients and input gradients.

    Returns:
        list[str]: One line per mismatch (empty when all agree).
    """
    out_a, grads_a, in_a = forward_backward(reference, inputs, loss_fn)
    out_b, grads_b, in_b = forward_backward(candidate, inputs, loss_fn)
    problems = []
    if len(out_a) != len(out_b):
        return [f'{len(out_a)} outputs vs {len(out_b)}']
    for i, (a, b) in enumerate(zip(out_a, out_b)):
        err = max_relative_error(b, a)
        if err > rtol:
            problems.append(f'output {i}: relative error {err:.2e}')
    if set(grads_a) != set(grads_b):
        problems.append(
            'different parameters got gradients: '
            f'{sorted(set(grads_a) ^ set(grads_b))}'
        )
    for name in sorted(set(grads_a) & set(grads_b)):
        err = max_relative_error(grads_b[name], grads_a[name])
        if err > rtol:
            problems.append(f'grad of {name}: relative error {err:.2e}')
    for i, (a, b) in enumerate(zip(in_a, in_b)):
        if a is not None and b is not None:
            err = max_relative_error(b, a)
            if err > rtol:
                problems.append(f'grad of input {i}: relative error {err:.2e}')
    return problems


HRNET_EXTRA = dict(
    stage1=dict(
        num_modules=1,
        num_branches=1,
        block='BOTTLENECK',
        num_blocks=(1,),
        num_channels=(16,),
    ),
    stage2=dict(
        num_modules=1,
        num_branches=2,
        block='BASIC',
        num_blocks=(1, 1),
        num_channels=(8, 16),
    ),
    stage3=dict(
        num_modules=1,
        num_branches=3,
        block='BASIC',
        num_blocks=(1, 1, 1),
        num_channels=(8, 16, 32),
    ),
    stage4=dict(
        num_modules=1,
        num_branches=4,
        block='BASIC',
        num_blocks=(1, 1, 1, 1),
        num_channels=(8, 16, 32, 64),
    ),
)

#: mmdet backbone configs (plain dicts, no mmdet import here) used by the
#: tests and ``tools/analysis_tools/conv_bn_coverage.py``.
#: Benchmark/check tool arguments that make the ResNet-50 classifier
#: config (configs/benchmark/resnet50_8xb64_finetune-cls-224.py) a quick
#: ResNet-18 on 10 classes at 32x32.
SMALL_CLASSIFIER_ARGS = [
    '--img-size',
    '32',
    '32',
    '--cfg-options',
    'model.backbone.depth=18',
    'model.in_channels=512',
    'model.num_classes=10',
]

MMDET_BACKBONES = {
    'resnet50': dict(type='ResNet', depth=50, norm_eval=True),
    'resnet18_with_cp': dict(
        type='ResNet', depth=18, with_cp=True, norm_eval=True
    ),
    'resnext50': dict(
        type='ResNeXt', depth=50, groups=32, base_width=4, norm_eval=True
    ),
    'regnetx_400mf': dict(type='RegNet', arch='regnetx_400mf', norm_eval=True),
    'hrnet': dict(type='HRNet', extra=HRNET_EXTRA, norm_eval=True),
    'resnet50_dcn': dict(
        type='ResNet',
        depth=50,
        norm_eval=True,
        dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
        stage_with_dcn=(False, False, True, True),
    ),
    'cspdarknet': dict(
        type='CSPDarknet',
        deepen_factor=0.33,
        widen_factor=0.25,
        norm_eval=True,
    ),
    'cspnext': dict(
        type='CSPNeXt', deepen_factor=0.167, widen_factor=0.25, norm_eval=True
    ),
    'mobilenetv2': dict(type='MobileNetV2', norm_eval=True),
    # Conv2dAdaptivePadding convs (mmtune/engine/mmcv_convs.py)
    'efficientnet_b0': dict(type='EfficientNet', arch='b0', norm_eval=True),
}


def run_python(
    args: Sequence[str],
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[str] = None,
    timeout: float = 300,
) -> str:
    """Run ``python *args`` in a fresh process and return its output
    (stdout and stderr together).

    Raises:
        AssertionError: the process failed or ran past ``timeout`` seconds
            (with the end of its output).
    """
    import subprocess
    import sys

    try:
        proc = subprocess.run(
            [sys.executable, *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f'python {" ".join(args)[:200]} ran past {timeout} s:\n'
            f'{exc.output}'
        ) from None
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


def run_isolated(func: Callable, *args: str, timeout: float = 180) -> str:
    """Run the module-level function ``func(*args)`` (string arguments) in
    a fresh Python process (:func:`run_python`), for tests that start a
    process group: a gloo group torn down while a DDP reducer still holds
    it can hang a process for good, and must not hang the test run.

    Returns:
        str: The process's output.
    """
    import inspect

    path = inspect.getfile(func)
    code = (
        'import importlib.util, sys\n'
        'spec = importlib.util.spec_from_file_location(\n'
        f'    "_isolated", {path!r})\n'
        'module = importlib.util.module_from_spec(spec)\n'
        'sys.path.insert(0, __import__("os").path.dirname(spec.origin))\n'
        'spec.loader.exec_module(module)\n'
        f'module.{func.__name__}(*{list(args)!r})\n'
    )
    return run_python(['-c', code], timeout=timeout)


# --- OpenMMLab codebases: real models from their own configs ------------
# (imports of mmengine and of the codebases stay inside the functions:
# this module is importable with torch alone)

#: The codebases whose models the tests and
#: ``tools/analysis_tools/sweep_conv_bn_coverage.py`` build.
CODEBASES = ('mmdet', 'mmseg', 'mmpretrain', 'mmpose')

#: One model per BN backbone family of each codebase, from the codebase's
#: own installed configs (``<codebase>/.mim/configs``):
#: ``name: (config, (height, width), overrides)``; ``overrides`` is merged
#: into the config (``Config.merge_from_dict``) before the model is built,
#: and a config of None is a family left out, with the reason.
CODEBASE_MODELS = {
    'mmdet': {
        'Faster R-CNN R50-FPN': (
            'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
            (64, 64),
            {},
        ),
        'RetinaNet R50-FPN': (
            'retinanet/retinanet_r50_fpn_1x_coco.py',
            (64, 64),
            {},
        ),
        'Mask R-CNN R50-FPN': (
            'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
            (64, 64),
            {},
        ),
        # mmcv's CPU deformable conv: no input smaller than its kernel
        'Faster R-CNN R50-DCN': (
            'dcn/faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py',
            (128, 128),
            {},
        ),
        'Faster R-CNN HRNetV2p-W18': (
            'hrnet/faster-rcnn_hrnetv2p-w18-1x_coco.py',
            (64, 64),
            {},
        ),
        'RetinaNet RegNetX-800MF': (
            'regnet/retinanet_regnetx-800MF_fpn_1x_coco.py',
            (64, 64),
            {},
        ),
        'Faster R-CNN ResNeSt-50 (SyncBN)': (
            'resnest/faster-rcnn_s50_fpn_syncbn-backbone+head_ms-range-'
            '1x_coco.py',
            (64, 64),
            {},
        ),
        'RetinaNet EfficientNet-B3': (
            'efficientnet/retinanet_effb3_fpn_8xb4-crop896-1x_coco.py',
            (64, 64),
            {},
        ),
        'YOLOX-S (CSPDarknet)': (
            'yolox/yolox_s_8xb8-300e_coco.py',
            (64, 64),
            {},
        ),
        'RTMDet-tiny (CSPNeXt)': (
            'rtmdet/rtmdet_tiny_8xb32-300e_coco.py',
            (64, 64),
            {},
        ),
        'YOLOv3 Darknet-53': (
            'yolo/yolov3_d53_8xb8-320-273e_coco.py',
            (64, 64),
            {},
        ),
        'YOLOv3 MobileNetV2': (
            'yolo/yolov3_mobilenetv2_8xb24-320-300e_coco.py',
            (64, 64),
            {},
        ),
        'SSDLite MobileNetV2': (
            'ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py',
            (64, 64),
            {},
        ),
        'CenterNet R18': (
            'centernet/centernet_r18_8xb16-crop512-140e_coco.py',
            (64, 64),
            {},
        ),
    },
    'mmseg': {
        'PSPNet R50-D8': (
            'pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py',
            (64, 64),
            {},
        ),
        'DeepLabV3+ R50-D8': (
            'deeplabv3plus/deeplabv3plus_r50-d8_4xb2-40k_cityscapes-'
            '512x1024.py',
            (64, 64),
            {},
        ),
        'FCN R18-D8': (
            'fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py',
            (64, 64),
            {},
        ),
        'BiSeNetV1 R18-D32': (
            'bisenetv1/bisenetv1_r18-d32_4xb4-160k_cityscapes-1024x1024.py',
            (64, 64),
            {},
        ),
        'BiSeNetV2': (
            'bisenetv2/bisenetv2_fcn_4xb4-160k_cityscapes-1024x1024.py',
            (64, 64),
            {},
        ),
        'Fast-SCNN': (
            'fastscnn/fast_scnn_8xb4-160k_cityscapes-512x1024.py',
            (64, 64),
            {},
        ),
        'DDRNet-23-slim': (
            'ddrnet/ddrnet_23-slim_in1k-pre_2xb6-120k_cityscapes-1024x1024.py',
            (64, 64),
            {},
        ),
        'PIDNet-S': (
            'pidnet/pidnet-s_2xb6-120k_1024x1024-cityscapes.py',
            (64, 64),
            {},
        ),
        # LRASPP pools its 1/8 features with a 49x49 kernel
        'MobileNetV3 LRASPP': (
            'mobilenet_v3/mobilenet-v3-d8_lraspp_4xb4-320k_cityscapes-'
            '512x1024.py',
            (392, 392),
            {},
        ),
        'MobileNetV2 DeepLabV3': (
            'mobilenet_v2/mobilenet-v2-d8_deeplabv3_4xb2-80k_cityscapes-'
            '512x1024.py',
            (64, 64),
            {},
        ),
        'FCN HRNet-W18': (
            'hrnet/fcn_hr18_4xb2-40k_cityscapes-512x1024.py',
            (64, 64),
            {},
        ),
        'OCRNet HRNet-W18-small': (
            'ocrnet/ocrnet_hr18s_4xb2-40k_cityscapes-512x1024.py',
            (64, 64),
            {},
        ),
        'STDC1': ('stdc/stdc1_4xb12-80k_cityscapes-512x1024.py', (64, 64), {}),
        'UNet-S5-D16 FCN': (
            'unet/unet-s5-d16_fcn_4xb4-160k_cityscapes-512x1024.py',
            (64, 64),
            {},
        ),
        'ERFNet': (
            'erfnet/erfnet_fcn_4xb4-160k_cityscapes-512x1024.py',
            (64, 64),
            {},
        ),
        'CGNet': (
            'cgnet/cgnet_fcn_4xb4-60k_cityscapes-680x680.py',
            (64, 64),
            {},
        ),
        'ICNet R18-D8': (
            'icnet/icnet_r18-d8_4xb2-80k_cityscapes-832x832.py',
            (64, 64),
            {},
        ),
    },
    'mmpretrain': {
        'ResNet-50': ('resnet/resnet50_8xb32_in1k.py', (64, 64), {}),
        'ResNeSt-50': ('resnest/resnest50_32xb64_in1k.py', (64, 64), {}),
        'ResNeXt-50 32x4d': (
            'resnext/resnext50-32x4d_8xb32_in1k.py',
            (64, 64),
            {},
        ),
        'SE-ResNet-50': ('seresnet/seresnet50_8xb32_in1k.py', (64, 64), {}),
        'Res2Net-50': (
            'res2net/res2net50-w14-s8_8xb32_in1k.py',
            (64, 64),
            {},
        ),
        'RegNetX-400MF': ('regnet/regnetx-400mf_8xb128_in1k.py', (64, 64), {}),
        'DenseNet-121': ('densenet/densenet121_4xb256_in1k.py', (64, 64), {}),
        'HRNet-W18': ('hrnet/hrnet-w18_4xb32_in1k.py', (64, 64), {}),
        # without its 224x224-only classifier (Linear layers, no BN)
        'VGG-11-BN': (
            'vgg/vgg11bn_8xb32_in1k.py',
            (64, 64),
            {'model.backbone.num_classes': -1},
        ),
        'MobileNetV2': (
            'mobilenet_v2/mobilenet-v2_8xb32_in1k.py',
            (64, 64),
            {},
        ),
        'MobileNetV3-small': (
            'mobilenet_v3/mobilenet-v3-small_8xb128_in1k.py',
            (64, 64),
            {},
        ),
        'EfficientNet-B0': (
            'efficientnet/efficientnet-b0_8xb32_in1k.py',
            (64, 64),
            {},
        ),
        'EfficientNetV2-B0': (
            'efficientnet_v2/efficientnetv2-b0_8xb32_in1k.py',
            (64, 64),
            {},
        ),
        'ShuffleNetV1 1x': (
            'shufflenet_v1/shufflenet-v1-1x_16xb64_in1k.py',
            (64, 64),
            {},
        ),
        'ShuffleNetV2 1x': (
            'shufflenet_v2/shufflenet-v2-1x_16xb64_in1k.py',
            (64, 64),
            {},
        ),
        'CSPResNet-50': ('cspnet/cspresnet50_8xb32_in1k.py', (64, 64), {}),
        'RepVGG-A0': ('repvgg/repvgg-A0_8xb32_in1k.py', (64, 64), {}),
        'MobileOne-S0': ('mobileone/mobileone-s0_8xb32_in1k.py', (64, 64), {}),
        'MobileViT-XXS': (
            'mobilevit/mobilevit-xxsmall_8xb128_in1k.py',
            (64, 64),
            {},
        ),
        # its last stage's attention biases are for 7x7 tokens
        'EfficientFormer-L1': (
            'efficientformer/efficientformer-l1_8xb128_in1k.py',
            (224, 224),
            {},
        ),
        # 2x2 tokens at the last stage (at 64x64, one: its attention's
        # query gets a zero gradient)
        'LeViT-128S': (
            'levit/levit-128s_8xb256_in1k.py',
            (128, 128),
            {'model.backbone.img_size': 128},
        ),
        'ConvNeXt-S': (None, 'LayerNorm only: no BN to fold'),
    },
    'mmpose': {
        'SimpleBaseline ResNet-50 (td-hm_res50)': (
            'body_2d_keypoint/topdown_heatmap/coco/'
            'td-hm_res50_8xb64-210e_coco-256x192.py',
            (64, 48),
            {},
        ),
        # HRNet: height and width divisible by 32
        'HRNet-W32 heatmap': (
            'body_2d_keypoint/topdown_heatmap/coco/'
            'td-hm_hrnet-w32_8xb64-210e_coco-256x192.py',
            (128, 96),
            {},
        ),
        # SimCC and RTMPose heads: the config's input size
        'SimCC ResNet-50': (
            'body_2d_keypoint/simcc/coco/'
            'simcc_res50_8xb64-210e_coco-256x192.py',
            (256, 192),
            {},
        ),
        'RTMPose-t (CSPNeXt, mmdet scope)': (
            'body_2d_keypoint/rtmpose/coco/'
            'rtmpose-t_8xb256-420e_coco-256x192.py',
            (256, 192),
            {},
        ),
        'LiteHRNet-18 heatmap': (
            'body_2d_keypoint/topdown_heatmap/coco/'
            'td-hm_litehrnet-18_8xb64-210e_coco-256x192.py',
            (128, 96),
            {},
        ),
        'MobileNetV2 heatmap': (
            'body_2d_keypoint/topdown_heatmap/coco/'
            'td-hm_mobilenetv2_8xb64-210e_coco-256x192.py',
            (64, 48),
            {},
        ),
        'ShuffleNetV2 heatmap': (
            'body_2d_keypoint/topdown_heatmap/coco/'
            'td-hm_shufflenetv2_8xb64-210e_coco-256x192.py',
            (64, 48),
            {},
        ),
        'ViPNAS MobileNetV3 heatmap': (
            'body_2d_keypoint/topdown_heatmap/coco/'
            'td-hm_vipnas-mbv3_8xb64-210e_coco-256x192.py',
            (64, 48),
            {},
        ),
        'RSN-18 heatmap': (
            'body_2d_keypoint/topdown_heatmap/coco/'
            'td-hm_rsn18_8xb32-210e_coco-256x192.py',
            (64, 48),
            {},
        ),
        'SCNet-50 heatmap': (
            'body_2d_keypoint/topdown_heatmap/coco/'
            'td-hm_scnet50_8xb64-210e_coco-256x192.py',
            (256, 192),
            {},
        ),
        'DEKR HRNet-W32 (bottom-up)': (
            'body_2d_keypoint/dekr/coco/dekr_hrnet-w32_8xb10-140e_coco-'
            '512x512.py',
            (64, 64),
            {},
        ),
    },
}


def import_without_torchvision(name: str):
    """Import the module ``name``; if that fails only because torchvision
    is not installed, import it again with stand-ins for torchvision's
    modules.

    mmpretrain's model package imports ``torchvision.ops.boxes`` at import
    time (for its box utilities and grounding metrics), though none of its
    BN backbones and classification heads uses torchvision. The stand-ins
    are used only after the plain import failed (so ``try: import ...``
    fallbacks elsewhere still see no torchvision) and are removed from
    ``sys.modules`` afterwards: ``import torchvision`` still fails, and any
    use of a name taken from them raises an ``ImportError`` that says
    torchvision is not installed.

    Returns:
        tuple: The module and the names of the torchvision modules that
        were stood in for (empty when none was needed).
    """
    import importlib
    import importlib.abc
    import importlib.machinery
    import sys
    import types

    try:
        return importlib.import_module(name), ()
    except ModuleNotFoundError as exc:
        if (exc.name or '').split('.')[0] != 'torchvision':
            raise

    class Missing:
        def __init__(self, qualname):
            self._qualname = qualname

        def __call__(self, *args, **kwargs):
            raise ImportError(
                f'{self._qualname}: torchvision is not installed'
            )

        def __getattr__(self, item):
            if item.startswith('__'):
                raise AttributeError(item)
            return Missing(f'{self._qualname}.{item}')

    class StandIn(types.ModuleType):
        def __getattr__(self, item):
            if item.startswith('__'):
                raise AttributeError(item)
            return Missing(f'{self.__name__}.{item}')

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname.split('.')[0] == 'torchvision':
                return importlib.machinery.ModuleSpec(
                    fullname, self, is_package=True
                )
            return None

        def create_module(self, spec):
            module = StandIn(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    finder = Finder()
    sys.meta_path.insert(0, finder)
    try:
        module = importlib.import_module(name)
    finally:
        sys.meta_path.remove(finder)
        stood_in = sorted(
            k for k in sys.modules if k.split('.')[0] == 'torchvision'
        )
        for key in stood_in:
            del sys.modules[key]
    return module, tuple(stood_in)


def codebase_registry(codebase: str):
    """``<codebase>.registry.MODELS`` after importing ``<codebase>.models``
    (through :func:`import_without_torchvision`)."""
    import importlib

    import_without_torchvision(f'{codebase}.models')
    return importlib.import_module(f'{codebase}.registry').MODELS


def without_init_cfg(cfg):
    """Set every ``init_cfg`` and ``pretrained`` key of a (nested) config
    to None, in place: no checkpoint is read, nothing is downloaded.

    Returns:
        The same ``cfg``.
    """
    if isinstance(cfg, dict):
        for key in list(cfg):
            if key in ('init_cfg', 'pretrained'):
                cfg[key] = None
            else:
                without_init_cfg(cfg[key])
    elif isinstance(cfg, (list, tuple)):
        for item in cfg:
            without_init_cfg(item)
    return cfg


def build_codebase_model(
    codebase: str, config: str, overrides: Optional[dict] = None
) -> nn.Module:
    """The model of the config ``<codebase>::<config>`` (the codebase's own
    installed config), built in the codebase's scope with ``init_cfg=None``
    everywhere (:func:`without_init_cfg`) and ``torch.manual_seed(0)``."""
    from mmengine.hub import get_config
    from mmengine.registry import DefaultScope

    models = codebase_registry(codebase)
    cfg = get_config(f'{codebase}::{config}')
    if overrides:
        cfg.merge_from_dict(overrides)
    model_cfg = without_init_cfg(cfg.model)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(codebase):
        return models.build(model_cfg)


def tensor_forward(codebase: str) -> Callable:
    """``forward(model, x)``: the outputs of every head of a model of
    ``codebase`` for the image batch ``x``, without post-processing (the
    models' ``mode='tensor'``). For mmseg the auxiliary heads too (mmseg's
    tensor mode leaves them out); for mmdet with data samples holding the
    image shapes (two-stage detectors need them past the RPN)."""

    def mmseg_forward(model, x):
        feats = model.extract_feat(x)
        heads = model.decode_head
        if isinstance(heads, nn.ModuleList):  # CascadeEncoderDecoder
            out = heads[0].forward(feats)
            for head in heads[1:]:
                out = head.forward(feats, out)
            outs = [out]
        else:
            outs = [heads.forward(feats)]
        aux = getattr(model, 'auxiliary_head', None)
        if aux is not None:
            for head in aux if isinstance(aux, nn.ModuleList) else [aux]:
                outs.append(head.forward(feats))
        return outs

    def mmdet_forward(model, x):
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        shape = tuple(x.shape[-2:])
        samples = [
            DetDataSample(
                metainfo=dict(
                    img_shape=shape,
                    ori_shape=shape,
                    pad_shape=shape,
                    batch_input_shape=shape,
                    scale_factor=(1.0, 1.0),
                )
            )
            for _ in range(x.shape[0])
        ]
        if not (getattr(model, 'with_rpn', False) and model.with_roi_head):
            return model(x, samples, mode='tensor')
        # two-stage: the RPN's outputs, and the RoI head on fixed boxes
        # (mmcv's CPU NMS, between the two, takes float32 only)
        feats = model.extract_feat(x)
        h, w = shape
        boxes = x.new_tensor(
            [
                [0, 0, w / 2, h / 2],
                [w / 4, h / 4, 3 * w / 4, 3 * h / 4],
                [0, 0, w, h],
                [w / 2, 0, w, h / 2],
            ]
        )
        proposals = [InstanceData(bboxes=boxes) for _ in samples]
        return [
            model.rpn_head(feats),
            model.roi_head.forward(feats, proposals, samples),
        ]

    def plain_forward(model, x):  # mmpretrain, mmpose
        return model(x, None, mode='tensor')

    return {'mmseg': mmseg_forward, 'mmdet': mmdet_forward}.get(
        codebase, plain_forward
    )


def _normalise_reason(reason: str, types: Dict[str, str]) -> str:
    """``reason`` with each module name in it replaced by the module's
    class name in angle brackets, so that like reasons group."""
    import re

    def name_of(match):
        token = match.group(0).rstrip('.')
        if token in types:
            return f'<{types[token]}>' + match.group(0)[len(token) :]
        return match.group(0)

    return re.sub(r'[A-Za-z_][\w.]*', name_of, reason)


def tune_mode_coverage(
    model: nn.Module, inputs: Sequence[Tensor], forward: Callable
) -> dict:
    """Check tune mode on ``model`` against its eval mode, as a user's run
    would turn it on: the whole model.

    ``model`` is put in eval mode; the Conv->BN pairs of
    :func:`find_conv_bn_pairs_at_runtime` are the oracle; a deep copy is
    turned on and both are run (``forward(model, *inputs)``, autograd on).

    Returns:
        dict: ``oracle`` (pairs), ``report``, ``missed`` (oracle pairs not
        converted), ``always_folded``, ``not_called`` (converted pairs),
        ``partly_folded`` (``{pair: FoldCount}`` of pairs called and not
        folded at every call), ``missed_reasons`` (the skip records that
        name a module of a missed pair) and ``skip_reasons`` (the others),
        both ``{reason: count}`` with module names replaced by their class
        names (``<ConvModule>``),
        ``max_abs_diff`` and ``max_abs_output`` (over all outputs).
    """
    import copy
    from collections import Counter

    from mmtune import turn_on_fast_conv_bn_eval

    model.eval()
    # a pair called several times is one pair
    oracle = list(
        dict.fromkeys(
            find_conv_bn_pairs_at_runtime(
                model, *inputs, forward=lambda *a: forward(model, *a)
            )
        )
    )
    tuned = copy.deepcopy(model)
    report = turn_on_fast_conv_bn_eval(tuned)
    expected = [t.detach() for t in _flatten(forward(model, *inputs))]
    got = [t.detach() for t in _flatten(forward(tuned, *inputs))]
    if len(expected) != len(got):
        raise AssertionError(f'{len(got)} outputs, eval mode {len(expected)}')
    diff, scale = 0.0, 0.0
    for a, b in zip(got, expected):
        if a.shape != b.shape:
            raise AssertionError(f'output shape {a.shape} vs {b.shape}')
        if b.is_floating_point() and b.numel():
            diff = max(diff, (a.double() - b.double()).abs().max().item())
            scale = max(scale, b.double().abs().max().item())
    names = {
        n: type(m).__name__
        for n, m in model.named_modules(remove_duplicate=False)
        if n
    }
    counts = report.fold_counts()
    converted = set(report.converted)
    missed = [pair for pair in oracle if pair not in converted]
    missed_modules = {m for pair in missed for m in pair}
    return dict(
        oracle=oracle,
        report=report,
        missed=missed,
        always_folded=[
            p for p, c in counts.items() if c.calls and not c.computed
        ],
        not_called=[p for p, c in counts.items() if not c.calls],
        partly_folded={p: c for p, c in counts.items() if c.computed},
        skip_reasons=Counter(
            _normalise_reason(s.reason, names)
            for s in report.skipped
            if not missed_modules & set(s.modules)
        ),
        missed_reasons=Counter(
            _normalise_reason(s.reason, names)
            for s in report.skipped
            if missed_modules & set(s.modules)
        ),
        max_abs_diff=diff,
        max_abs_output=scale,
    )
