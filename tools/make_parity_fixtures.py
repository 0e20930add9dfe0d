"""Generate parity fixtures from the *official* released code (run by hand, never by CI).

For each checkpoint format that ``segcli convert`` should read, this builds a small model with
the official code, gives it random but non-trivial weights, saves the checkpoint exactly as the
official training/conversion tools do, runs the official inference on a fixed input and writes:

    tests/fixtures/official/NAME.pth        the checkpoint (official on-disk structure)
    tests/fixtures/official/NAME_io.pt      plain dict of tensors: input + official outputs
    tests/fixtures/official/NAME.json       architecture, pre-processing, tensor descriptions,
                                            versions and repository commits used
    tests/fixtures/official/NAME_keys.txt   every checkpoint key with dtype and shape

Formats (NAME): ``segvit-v1``, ``segvit-v1-shrunk``, ``mmseg-vit``, ``mmseg-setr``,
``mmseg-deeplabv3plus`` (MMSegmentation 0.24 world) and ``dtop`` (MMSegmentation 1.x world).
The two worlds cannot share one interpreter, so ``dtop`` runs in a child process whose
``PYTHONPATH`` starts with ``--mmseg1-path`` (a ``pip install --target`` folder holding
mmcv-lite 2.x, mmengine and mmsegmentation 1.x).

``test-parity`` (MMSegmentation 0.24 world, after ``segvit-v1``, whose checkpoint it reuses) writes
``test-parity/``: PNG images, the official test-time labels of each dataset config's test
pipeline (``labels.npz``) and the settings (``test-parity.json``); see ``make_test_parity``.

``train-pipeline`` (MMSegmentation 0.24 world, no checkpoint) writes ``train-pipeline.npz`` and
``train-pipeline.json``: every random draw of the official train transforms on synthetic
images and labels, and each transform's output (see ``make_train_pipeline``).

``segvit-optim`` (MMSegmentation 0.24 world, after ``segvit-v1`` and ``segvit-v1-shrunk``, whose
reduced models and weights it reuses) writes ``segvit-optim.json`` and ``segvit-optim_io.pt``: per
official SegViT config the lr and weight decay of every parameter from mmcv's ``build_optimizer``
with the config's ``paramwise_cfg``, the lr of ``PolyLrUpdaterHook`` at iterations 0, 1, 1499,
1500, mid and last, the official ``ATMLoss`` on fixed random outputs, and one training step
(``train_step`` + ``OptimizerHook`` with the config's grad clip) with the update of every
parameter (see ``make_segvit_optim``).

Nothing here is needed by segcli or its tests; the official code is imported from the
repository paths given on the command line and is never copied into this project.

Environment (CPU only; what these fixtures were made with)::

    python3 -m venv /tmp/ref/v1 && . /tmp/ref/v1/bin/activate
    pip install "setuptools<70" wheel "numpy<2" torch torchvision
    MMCV_WITH_OPS=0 pip install --no-build-isolation mmcv==1.7.2
    pip install mmsegmentation==0.24.1 timm matplotlib prettytable scipy einops fvcore \
        rich termcolor pyyaml packaging
    pip uninstall -y opencv-python && pip install "opencv-python-headless<4.11" "numpy<2"
    pip install --no-deps --target /tmp/ref/mm1 mmcv-lite==2.0.1 mmengine==0.7.0 \
        mmsegmentation==1.0.0rc6
    # official repositories (any way of getting a checkout):
    #   zbwxp/SegVit -> /tmp/ref/SegVit, zbwxp/Dynamic-Token-Pruning -> /tmp/ref/Dynamic-Token-Pruning

Usage::

    python tools/make_parity_fixtures.py --segvit-repo /tmp/ref/SegVit \
        --dtop-repo /tmp/ref/Dynamic-Token-Pruning --mmseg1-path /tmp/ref/mm1 \
        [--formats segvit-v1,dtop] [--out tests/fixtures/official]

``tools/official_env.py`` supplies the import shims (a stand-in for mmcv's compiled ops, which
no model here uses, and skipping mmseg 0.24's ``mmcv<=1.6`` assertion).

Weights: the official ``init_weights`` first; BatchNorm running statistics are collected on a
few random batches; then every floating-point tensor of the state dict except loss buffers
(ATM's ``loss_decode.criterion.empty_weight``) is perturbed deterministically: 1-D tensors and
embeddings + N(0, 0.2), matrices and kernels + noise of std 0.3/sqrt(fan_in), BatchNorm running
variances x exp(N(0, 0.2)). ATM heads then get a larger class head and mask-query projection, and
DToP's auxiliary heads are made confident, so the outputs have contrast and tokens do exit (the
json records what was scaled). Runs are single-threaded and seeded; checkpoint ``time`` fields
are fixed, so reruns give the same bytes.
"""
from __future__ import annotations

import argparse
import collections
import copy
import io
import json
import logging
import os
import pickletools
import pprint
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official_env  # noqa: E402

V0_FORMATS = ["segvit-v1", "segvit-v1-shrunk", "mmseg-vit", "mmseg-setr", "mmseg-deeplabv3plus",
              "train-pipeline",
              "segvit-optim"]
TEST_FORMATS = ["test-parity"]  # MMSegmentation 0.24 world, after segvit-v1
V1_FORMATS = ["dtop"]
FIXED_TIME = "Thu Jan  1 00:00:00 2026"  # replaces the wall-clock time the savers write
SEED = 20240601

JAX_NORM = dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5], to_rgb=True)
IMAGENET_NORM = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)


# ----------------------------------------------------------------------------- generic helpers


def quiet_loggers() -> None:
    for name in ("mmcv", "mmseg", "mmengine", "root", "py.warnings"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")


def synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """A deterministic RGB uint8 image [H, W, 3]: smooth colour blobs plus mild noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, height // 24), max(2, width // 24), generator=gen) * 255
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    noisy = smooth + torch.randn(1, 3, height, width, generator=gen) * 12
    return noisy.clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).contiguous().numpy()


MATRIX_GAIN = 0.3  # noise std of matrices / kernels = MATRIX_GAIN / sqrt(fan_in) (keeps ATM queries distinct)


def perturb_(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Make every floating tensor of the state dict non-trivial (deterministic; see module doc)."""
    gen = torch.Generator().manual_seed(seed)
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point() or ".loss_decode." in name:
                continue  # integer counters; loss buffers (ATM's empty_weight) are constants, never trained
            if name.endswith("running_var"):
                tensor.mul_(torch.exp(torch.randn(tensor.shape, generator=gen) * std))
                continue
            if tensor.dim() >= 2 and name not in embeddings and not name.endswith(("pos_embed", "cls_token")):
                fan_in = tensor[0].numel()
                tensor.add_(torch.randn(tensor.shape, generator=gen) * (MATRIX_GAIN / fan_in ** 0.5))
            else:
                tensor.add_(torch.randn(tensor.shape, generator=gen) * std)


ATM_SHARPEN = {"class_embed_weight_gain": 8.0, "last_cross_attn_q_gain": 6.0}


def sharpen_atm_(model: torch.nn.Module) -> dict:
    """Random ATM heads give near-uniform class probabilities and flat masks; scale the class
    head and the mask-producing (last) cross-attention query projection of every ATM decoder so
    the fixture's outputs have some contrast. Returns what was done, for the json."""
    touched = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("class_embed"):
                module.weight.mul_(ATM_SHARPEN["class_embed_weight_gain"])
                touched.append(f"{name}.weight")
            layers = getattr(module, "layers", None)
            if isinstance(layers, torch.nn.ModuleList) and len(layers) and hasattr(
                    getattr(layers[-1], "multihead_attn", None), "q"):
                q = layers[-1].multihead_attn.q
                q.weight.mul_(ATM_SHARPEN["last_cross_attn_q_gain"])
                q.bias.mul_(ATM_SHARPEN["last_cross_attn_q_gain"])
                touched.append(f"{name}.layers.{len(layers) - 1}.multihead_attn.q")
    return dict(ATM_SHARPEN, tensors=touched)


def calibrate_bn_(model: torch.nn.Module, forward, shape, seed: int, batches: int = 3) -> None:
    """Collect BatchNorm running statistics on random batches, as training would have."""
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not has_bn:
        return
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            forward(torch.randn(*shape, generator=gen))
    model.eval()


def key_table(state_dict) -> str:
    lines = []
    for key, value in state_dict.items():
        if torch.is_tensor(value):
            lines.append(f"{key}\t{str(value.dtype).replace('torch.', '')}\t{list(value.shape)}")
        else:
            lines.append(f"{key}\t{type(value).__name__}\t-")
    return "\n".join(lines) + "\n"


def pickle_globals(path: Path) -> list[str]:
    """The ``module.name`` globals a torch zip checkpoint's pickle refers to (what an unpickler must allow)."""
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        data = archive.read(pkl)
    found, strings = set(), []
    for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
        elif opcode.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(f"{strings[-2]}.{strings[-1]}")
    return sorted(found)


def weights_only_loadable(path: Path) -> str:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return "yes"
    except Exception as err:  # the message names the first refused global
        lines = [ln.strip() for ln in str(err).splitlines() if "global" in ln.lower()] or [str(err).splitlines()[0]]
        return f"no: {type(err).__name__}: {lines[0][:300]}"


def git_commit(repo: Path | None) -> str | None:
    if repo is None:
        return None
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return None


def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__}
    for name in ("mmcv", "mmseg", "mmengine", "timm"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "?")
    return out


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def config_text(**sections) -> str:
    return "\n".join(f"{k} = {pprint.pformat(v, sort_dicts=False)}" for k, v in sections.items()) + "\n"


class Fixture:
    """Collects the tensors and the descriptions of one format, then writes the four files."""

    def __init__(self, name: str, out_dir: Path):
        self.name, self.out_dir = name, out_dir
        self.tensors: dict[str, torch.Tensor] = {}
        self.descriptions: dict[str, str] = {}

    def add(self, key: str, tensor: torch.Tensor, description: str) -> None:
        self.tensors[key] = tensor.detach().clone().contiguous().cpu()
        self.descriptions[key] = description

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / f"{self.name}.pth"

    def write(self, info: dict, state_dict) -> None:
        torch.save(self.tensors, self.out_dir / f"{self.name}_io.pt")
        (self.out_dir / f"{self.name}_keys.txt").write_text(key_table(state_dict))
        info = dict(info)
        info["checkpoint"] = {
            **info.get("checkpoint", {}),
            "file": self.ckpt_path.name,
            "torch_load_weights_only": weights_only_loadable(self.ckpt_path),
            "pickle_globals": pickle_globals(self.ckpt_path),
            "num_tensors": sum(1 for v in state_dict.values() if torch.is_tensor(v)),
        }
        info["tensors"] = {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "description": self.descriptions[k]}
            for k, v in self.tensors.items()
        }
        info["versions"] = versions()
        with open(self.out_dir / f"{self.name}.json", "w") as handle:
            json.dump(jsonable(info), handle, indent=1)
            handle.write("\n")


# ----------------------------------------------------------------------------- MMSegmentation 0.24 world


def v0_setup(segvit_repo: Path | None):
    official_env.import_mmseg()
    if segvit_repo is not None:
        official_env.import_repo_as_package(
            "segvit_official", segvit_repo, ["decode_heads", "backbone", "losses", "tools", "tools.model_converters"],
            ["losses.atm_loss", "decode_heads.atm_head", "decode_heads.tpn_atm_head", "backbone.vit_shrink"])
    quiet_loggers()


def v0_build(model_cfg: dict, seed: int):
    from mmcv.utils import Config
    from mmseg.models import build_segmentor

    torch.manual_seed(seed)
    model = build_segmentor(Config(dict(model=copy.deepcopy(model_cfg))).model)
    model.init_weights()
    return model


def v0_normalize(image_rgb: np.ndarray, norm: dict) -> torch.Tensor:
    """mmseg 0.x ``Normalize`` on an image loaded BGR by mmcv.imread (to_rgb flips it back)."""
    import mmcv

    image_bgr = np.ascontiguousarray(image_rgb[..., ::-1])
    normed = mmcv.imnormalize(image_bgr, np.array(norm["mean"], np.float32), np.array(norm["std"], np.float32),
                              norm["to_rgb"])
    return torch.from_numpy(np.ascontiguousarray(normed.transpose(2, 0, 1)))[None].float()


def v0_metas(height: int, width: int) -> list[dict]:
    shape = (height, width, 3)
    return [dict(ori_shape=shape, img_shape=shape, pad_shape=shape, flip=False, scale_factor=1.0)]


def v0_save(model, path: Path, meta: dict) -> None:
    """``mmcv.runner.save_checkpoint`` (what mmseg 0.x's CheckpointHook calls), fixed ``time``."""
    from mmcv.runner import save_checkpoint

    save_checkpoint(model, str(path), meta=copy.deepcopy(meta))
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["meta"]["time"] = FIXED_TIME
    torch.save(checkpoint, path)


def v0_train_meta(name: str, cfg_text: str, classes, palette, iters: int) -> dict:
    import mmseg

    return dict(
        env_info="sys.platform: linux (synthetic fixture run on CPU)",
        seed=SEED,
        exp_name=f"{name}.py",
        mmseg_version=f"{mmseg.__version__}",
        config=cfg_text,
        CLASSES=tuple(classes),
        PALETTE=[list(p) for p in palette],
        epoch=1,
        iter=iters,
    )


def class_names(n: int):
    names = [f"class{i}" for i in range(n)]
    gen = torch.Generator().manual_seed(n)
    palette = torch.randint(0, 256, (n, 3), generator=gen).tolist()
    return names, palette


def vit_small(**over) -> dict:
    cfg = dict(type="VisionTransformer", img_size=(64, 64), patch_size=16, in_channels=3, embed_dims=64,
               num_layers=4, num_heads=4, mlp_ratio=4, drop_path_rate=0.1, attn_drop_rate=0.0, drop_rate=0.0,
               out_indices=[1, 2, 3], final_norm=False, norm_cfg=dict(type="LN", eps=1e-6, requires_grad=True),
               with_cls_token=False, interpolate_mode="bicubic")
    cfg.update(over)
    return cfg


def capture_outputs(module, store: dict, key: str):
    def hook(_module, _args, output):
        store[key] = output
    return module.register_forward_hook(hook)


def atm_dict_forward(head, features):
    """The head's full output dict (its training-mode return value) with every submodule in eval mode.

    Only the head object's own ``training`` flag is raised: that flag alone selects the dict
    return in the official forward; dropout and drop-path stay off.
    """
    head.training = True
    try:
        with torch.no_grad():
            return head(features)
    finally:
        head.training = False


def add_backbone_features(fx: Fixture, features, out_indices, prefix="feat", layout="NCHW") -> None:
    for idx, feature in zip(out_indices, features):
        fx.add(f"{prefix}.{idx}", feature, f"backbone output after block {idx} (0-based), {layout}, as the backbone "
               "returns it (no final norm unless the config has final_norm)")


def make_segvit_v1(out_dir: Path, segvit_repo: Path) -> None:
    name, num_classes = "segvit-v1", 6
    norm = JAX_NORM
    model_cfg = dict(
        type="EncoderDecoder",
        pretrained=None,
        backbone=vit_small(),
        decode_head=dict(type="ATMHead", img_size=64, in_channels=64, channels=64, num_classes=num_classes,
                         num_layers=3, num_heads=2, use_stages=3, embed_dims=32,
                         loss_decode=dict(type="ATMLoss", num_classes=num_classes, dec_layers=3, loss_weight=1.0)),
        test_cfg=dict(mode="whole"),
    )
    slide_cfg = dict(mode="slide", crop_size=(64, 64), stride=(32, 32))
    model = v0_build(model_cfg, SEED)
    perturb_(model, SEED + 1)
    adjustment = sharpen_atm_(model)
    model.eval()
    fx = Fixture(name, out_dir)
    classes, palette = class_names(num_classes)
    cfg_text = config_text(model=model_cfg, img_norm_cfg=norm)
    v0_save(model, fx.ckpt_path, v0_train_meta(name, cfg_text, classes, palette, 160000))

    height, width = 96, 96
    image = synthetic_image(height, width, SEED + 2)
    x = v0_normalize(image, norm)
    fx.add("image", torch.from_numpy(image), "RGB uint8 [H, W, 3] before normalisation")
    fx.add("input", x, "normalised input [1, 3, H, W] = mmcv.imnormalize(BGR image, mean, std, to_rgb=True)")
    metas = v0_metas(height, width)
    head = model.decode_head
    stage_out: dict = {}
    hooks = [capture_outputs(getattr(head, f"decoder_{i + 1}"), stage_out, f"stage{i + 1}") for i in range(3)]
    with torch.no_grad():
        features = model.extract_feat(x)
        out = atm_dict_forward(head, features)
        seg_logits = model.encode_decode(x, metas)
        seg_prob = model.inference(x, metas, rescale=True)
    for h in hooks:
        h.remove()
    add_backbone_features(fx, features, model_cfg["backbone"]["out_indices"])
    for i in range(3):
        queries, attn = stage_out[f"stage{i + 1}"]
        fx.add(f"head.stage{i + 1}.queries", queries.transpose(0, 1),
               f"decoder_{i + 1} output queries [B, K, D] (stage {i + 1}; stage 1 reads the deepest out_index)")
        fx.add(f"head.stage{i + 1}.attn", attn,
               f"decoder_{i + 1} last layer cross-attention logits QK^T*d^-0.5 averaged over heads, [B, K, N] "
               "(pre-softmax; the head transposes and reshapes it to its mask)")
    fx.add("head.pred_logits", out["pred_logits"], "class logits of the last stage [B, K, K+1] (last = no-object)")
    fx.add("head.pred_masks", out["pred_masks"],
           "cumulative mask logits (sum over stages on the last stage grid) upsampled bilinearly "
           "(align_corners=False) to (img_size, img_size) of the head config, [B, K, img_size, img_size]")
    for j, aux in enumerate(out["aux_outputs"]):
        fx.add(f"head.aux{j}.pred_logits", aux["pred_logits"], f"class logits after stage {j + 1} [B, K, K+1]")
        fx.add(f"head.aux{j}.pred_masks", aux["pred_masks"],
               f"cumulative mask logits after stage {j + 1} at token-grid resolution [B, K, h, w] (not upsampled)")
    fx.add("head.pred", out["pred"], "semantic_inference: einsum(softmax(pred_logits)[..., :K], sigmoid(pred_masks)) "
           "[B, K, img_size, img_size]")
    fx.add("seg_logits", seg_logits, "EncoderDecoder.encode_decode: head.pred resized bilinearly (align_corners="
           "False) to the input size, [B, K, H, W] (whole mode; pre-softmax scores)")
    assert torch.allclose(seg_prob, seg_logits.softmax(dim=1), atol=1e-6)  # inference = softmax(encode_decode)

    # official test mode of the released configs: slide with crop = img_size
    h2, w2 = 64, 96
    image2 = synthetic_image(h2, w2, SEED + 3)
    x2 = v0_normalize(image2, norm)
    model.test_cfg = type(model.test_cfg)(slide_cfg)
    with torch.no_grad():
        slide_logits = model.slide_inference(x2, v0_metas(h2, w2), rescale=True)
    fx.add("slide.image", torch.from_numpy(image2), "second RGB uint8 image for slide inference")
    fx.add("slide.input", x2, "its normalised input [1, 3, 64, 96]")
    fx.add("slide.seg_logits", slide_logits, "EncoderDecoder.slide_inference (crop 64, stride 32): average of the "
           "overlapping crops' encode_decode outputs, pre-softmax [B, K, H, W]")
    assert torch.allclose(F.interpolate(out["pred"], size=(height, width), mode="bilinear", align_corners=False),
                          seg_logits, atol=1e-6)
    info = dict(
        format=name,
        official_repo={"name": "zbwxp/SegVit", "commit": git_commit(segvit_repo)},
        official_modules=["mmseg.models.backbones.vit.VisionTransformer (mmseg 0.24.1)",
                          "SegVit decode_heads/atm_head.py: ATMHead", "mmseg EncoderDecoder 0.24.1"],
        config=model_cfg, slide_test_cfg=slide_cfg, img_norm_cfg=norm,
        input_size=[height, width], slide_input_size=[h2, w2], num_classes=num_classes, classes=classes,
        align_corners=False, seed=SEED,
        checkpoint={"saved_with": "mmcv.runner.save_checkpoint (meta + state_dict, no optimizer)"},
        weight_adjustment=adjustment,
        notes=[
            "Whole-mode input is square because the official ATM head reshapes token maps with h = w = "
            "int(sqrt(N)) (and drops the first token if N is odd): non-square whole-mode inputs fail in the "
            "official code. The released configs test in slide mode with crop = img_size; slide.* covers that.",
            "Pos-embed is resized from the 4x4 table to the 6x6 (96x96) grid in the whole-mode run.",
        ],
    )
    fx.write(info, torch.load(fx.ckpt_path, map_location="cpu", weights_only=False)["state_dict"])


def make_segvit_v1_shrunk(out_dir: Path, segvit_repo: Path) -> None:
    name, num_classes = "segvit-v1-shrunk", 6
    norm = JAX_NORM
    backbone = vit_small(type="vit_shrink", shrink_idx=2, out_indices=[1, 3])
    model_cfg = dict(
        type="EncoderDecoder",
        pretrained=None,
        backbone=backbone,
        decode_head=dict(type="TPNATMHead", img_size=64, in_channels=64, channels=64, num_classes=num_classes,
                         num_layers=3, num_heads=2, use_stages=2, embed_dims=32,
                         loss_decode=dict(type="ATMLoss", num_classes=num_classes, dec_layers=3, loss_weight=1.0)),
        test_cfg=dict(mode="whole"),
    )
    slide_cfg = dict(mode="slide", crop_size=(64, 64), stride=(32, 32))
    model = v0_build(model_cfg, SEED + 10)
    perturb_(model, SEED + 11)
    adjustment = sharpen_atm_(model)
    model.eval()
    fx = Fixture(name, out_dir)
    classes, palette = class_names(num_classes)
    v0_save(model, fx.ckpt_path, v0_train_meta(name, config_text(model=model_cfg, img_norm_cfg=norm), classes,
                                               palette, 160000))
    height, width = 96, 96
    image = synthetic_image(height, width, SEED + 12)
    x = v0_normalize(image, norm)
    fx.add("image", torch.from_numpy(image), "RGB uint8 [H, W, 3] before normalisation")
    fx.add("input", x, "normalised input [1, 3, H, W]")
    metas = v0_metas(height, width)
    head = model.decode_head
    store: dict = {}
    hooks = [capture_outputs(getattr(head, f"decoder_{i + 1}"), store, f"tpn{i + 1}") for i in range(2)]
    hooks.append(capture_outputs(head.atm.decoder_1, store, "atm"))
    hooks.append(head.atm.register_forward_pre_hook(lambda _m, args: store.__setitem__("qmap", args[0][0])))
    with torch.no_grad():
        features = model.extract_feat(x)
        head.atm.training = True  # dict return of the inner ATM head (flag only)
        try:
            out = atm_dict_forward(head, features)
        finally:
            head.atm.training = False
        seg_logits = model.encode_decode(x, metas)
        seg_prob = model.inference(x, metas, rescale=True)
    for h in hooks:
        h.remove()
    add_backbone_features(fx, features, backbone["out_indices"], layout="[B, N, C] tokens (vit_shrink does not "
                          "reshape); blocks >= shrink_idx are on the 2x-subsampled grid")
    for i in range(2):
        fx.add(f"tpn.decoder_{i + 1}.queries", store[f"tpn{i + 1}"].transpose(0, 1),
               f"TPN query-upsampling decoder_{i + 1} output [B, Q, D] (Q = (img_size/16)^2 learned queries; "
               f"decoder_{i + 1} reads backbone output {i} of out_indices, not reversed)")
    fx.add("tpn.q_map", store["qmap"], "queries reshaped to a map [B, D, img_size/16, img_size/16]: the input of "
           "the inner ATMSingleHead (use_proj=False)")
    queries, attns = store["atm"]
    for j, (q, a) in enumerate(zip(queries, attns)):
        fx.add(f"atm.layer{j}.queries", q.transpose(0, 1), f"inner ATM decoder layer {j} output queries [B, K, D]")
        fx.add(f"atm.layer{j}.attn", a, f"inner ATM decoder layer {j} cross-attention logits averaged over heads "
               "[B, K, Q] (pre-softmax)")
    fx.add("head.pred_logits", out["pred_logits"], "class logits of the last ATM layer [B, K, K+1]")
    fx.add("head.pred_masks", out["pred_masks"], "last ATM layer's own mask logits (no sum over layers) upsampled "
           "to (img_size, img_size) [B, K, 64, 64]")
    for j, aux in enumerate(out["aux_outputs"]):
        fx.add(f"head.aux{j}.pred_logits", aux["pred_logits"], f"class logits of ATM layer {j} [B, K, K+1]")
        fx.add(f"head.aux{j}.pred_masks", aux["pred_masks"], f"mask logits of ATM layer {j} on the query grid "
               "[B, K, img_size/16, img_size/16]")
    fx.add("head.pred", out["pred"], "semantic_inference of pred_logits / pred_masks [B, K, 64, 64]")
    fx.add("seg_logits", seg_logits, "EncoderDecoder.encode_decode (whole): head.pred resized to the input [B, K, H, W]")
    assert torch.allclose(seg_prob, seg_logits.softmax(dim=1), atol=1e-6)  # inference = softmax(encode_decode)
    h2, w2 = 64, 96
    image2 = synthetic_image(h2, w2, SEED + 13)
    x2 = v0_normalize(image2, norm)
    model.test_cfg = type(model.test_cfg)(slide_cfg)
    with torch.no_grad():
        slide_logits = model.slide_inference(x2, v0_metas(h2, w2), rescale=True)
    fx.add("slide.image", torch.from_numpy(image2), "second RGB uint8 image for slide inference")
    fx.add("slide.input", x2, "its normalised input [1, 3, 64, 96]")
    fx.add("slide.seg_logits", slide_logits, "EncoderDecoder.slide_inference (crop 64, stride 32), pre-softmax")
    info = dict(
        format=name,
        official_repo={"name": "zbwxp/SegVit", "commit": git_commit(segvit_repo)},
        official_modules=["SegVit backbone/vit_shrink.py: vit_shrink (subclass of mmseg 0.24.1 VisionTransformer)",
                          "SegVit decode_heads/tpn_atm_head.py: TPNATMHead (+ atm_single_head.py: ATMSingleHead)"],
        released_config="configs/segvit/shrink/segvit_vit-l_jax_shrink8_tpnatm.py (shrink_idx=8, out_indices "
                        "[7, 23], TPNATMHead, use_stages=2) scaled down: depth 4, shrink_idx=2, out_indices [1, 3]",
        config=model_cfg, slide_test_cfg=slide_cfg, img_norm_cfg=norm, input_size=[height, width],
        slide_input_size=[h2, w2], num_classes=num_classes, classes=classes, align_corners=False, seed=SEED,
        checkpoint={"saved_with": "mmcv.runner.save_checkpoint (meta + state_dict, no optimizer)"},
        weight_adjustment=adjustment,
        notes=[
            "The TPN queries are (img_size/16)^2 learned embeddings used as they are for any input size: at "
            "96x96 the head still outputs a 4x4 query map (upsampled to 64x64, then to 96x96).",
            "vit_shrink and the ATM heads need square token grids (h = w = int(sqrt(N))).",
        ],
    )
    fx.write(info, torch.load(fx.ckpt_path, map_location="cpu", weights_only=False)["state_dict"])


# ----------------------------------------------------------------------------- test-time parity (mmseg 0.24.1)

# (name, official config under the SegVit checkout, where its test_cfg comes from when the config file
# has none of its own). Each config's test pipeline and test_cfg are read from the files and scaled
# so that the slide window is the 64 px of the segvit-v1 fixture model.
TEST_PARITY_CONFIGS = [
    ("pc", "configs/segvit/segvit_vit-l_jax_480x480_80k_pc.py", None),
    ("ade20k-512", "configs/_base_/datasets/ade20k.py", "configs/_base_/models/seg_vit-b16.py"),
    ("ade20k-640", "configs/segvit/segvit_vit-l_jax_640x640_160k_ade20k.py", None),
    ("coco-stuff10k", "configs/segvit/segvit_vit-l_jax_512x512_80k_cocostuff10k.py", None),
]
TEST_PARITY_IMAGES = [(75, 100), (100, 75), (150, 200), (60, 200)]  # (h, w): 4:3, 3:4, downscaled, 1:3.33
TEST_PARITY_AUG = ("pc", [0.75, 1.25])  # the config also run with img_ratios + flip (aug_test)
TEST_PARITY_TIE = 1e-4  # official top-2 probability margin below which a pixel counts as a near-tie


def _scaled_test_setup(cfg_path: Path, test_cfg_path: Path | None, window: int, ratios=None) -> tuple:
    """(pipeline, test_cfg, description) of an official config, sizes scaled so the crop is ``window``."""
    from mmcv.utils import Config

    cfg = Config.fromfile(str(cfg_path))
    test_cfg = copy.deepcopy(dict(Config.fromfile(str(test_cfg_path)).model.test_cfg if test_cfg_path
                                  else cfg.model.test_cfg))
    pipeline = copy.deepcopy([dict(step) for step in cfg.data.test.pipeline])
    official = {"test_cfg": copy.deepcopy(test_cfg), "pipeline": copy.deepcopy(pipeline)}
    factor = window / test_cfg["crop_size"][0]
    aug = next(step for step in pipeline if step["type"] == "MultiScaleFlipAug")
    aug["img_scale"] = tuple(int(round(side * factor)) for side in aug["img_scale"])
    aug["transforms"] = [dict(step) for step in aug["transforms"]]
    resize = next(step for step in aug["transforms"] if step["type"] == "Resize")
    if resize.get("min_size") is not None:
        resize["min_size"] = int(round(resize["min_size"] * factor))
    if ratios is not None:
        aug["img_ratios"], aug["flip"] = list(ratios), True
    test_cfg["crop_size"] = (window, window)
    test_cfg["stride"] = tuple(int(round(s * factor)) for s in test_cfg["stride"])
    scaled = dict(mode=test_cfg["mode"], crop_size=list(test_cfg["crop_size"]), stride=list(test_cfg["stride"]),
                  scale=list(aug["img_scale"]), min_size=resize.get("min_size"),
                  scales=list(aug.get("img_ratios") or [1.0]), flip=bool(aug.get("flip", False)))
    norm = next(step for step in aug["transforms"] if step["type"] == "Normalize")
    return pipeline, test_cfg, dict(official=official, factor=factor, test=scaled,
                                    img_norm_cfg={k: norm[k] for k in ("mean", "std", "to_rgb")})


def _official_test(model, pipeline: list, image_path: Path):
    """The official test path on one image file: its pipeline, then ``simple_test`` or ``aug_test``
    (through ``forward_test``, as ``mmseg.apis.single_gpu_test`` calls it), plus the averaged
    probabilities of ``EncoderDecoder.inference`` for the near-tie mask."""
    from mmcv.parallel import collate
    from mmseg.datasets.pipelines import Compose

    data = Compose(pipeline)(dict(img_info=dict(filename=str(image_path)), img_prefix=None))
    data = collate([data], samples_per_gpu=1)
    imgs = data["img"]
    metas = [m.data[0] for m in data["img_metas"]]
    with torch.no_grad():
        labels = model(return_loss=False, rescale=True, img=imgs, img_metas=metas)[0]
        probs = sum(model.inference(img, meta, rescale=True) for img, meta in zip(imgs, metas)) / len(imgs)
    assert np.array_equal(labels, probs.argmax(1)[0].numpy())
    top2 = probs.topk(2, dim=1).values[0]  # [2, H, W]
    near_tie = ((top2[0] - top2[1]) < TEST_PARITY_TIE).numpy()
    sizes = [list(meta[0]["img_shape"][:2]) for meta in metas]
    return labels.astype(np.uint8), near_tie, sizes


def make_test_parity(out_dir: Path, segvit_repo: Path) -> None:
    """Official test-time labels of the segvit-v1 fixture model under each dataset's test pipeline.

    The model is ``segvit-v1.pth`` (made first by the ``segvit-v1`` format) loaded into the
    official ``EncoderDecoder`` + ``ATMHead``. For each config of ``TEST_PARITY_CONFIGS`` the test
    pipeline (``LoadImageFromFile -> MultiScaleFlipAug(Resize(keep_ratio, min_size), RandomFlip,
    Normalize, ImageToTensor)``) and ``test_cfg`` are read from the official config files; sizes
    (``img_scale``, ``min_size``, slide crop and stride) are scaled by ``64 / crop`` so that the
    windows are the model's 64 px (the official ATM head needs square windows of its img_size).
    The resize rule, mmcv's rounding and the slide grid are exercised unchanged. Images are PNG
    files read by the pipeline itself; labels (and a near-tie mask: official top-2 probability
    margin < ``TEST_PARITY_TIE``) go to one compressed npz; settings to ``test-parity.json``.
    """
    from mmcv.runner import load_checkpoint
    import cv2

    ckpt = out_dir / "segvit-v1.pth"
    if not ckpt.is_file():
        raise SystemExit(f"{ckpt} is missing: make the segvit-v1 format first")
    base = json.loads((out_dir / "segvit-v1.json").read_text())
    model = v0_build(base["config"], SEED)
    load_checkpoint(model, str(ckpt), map_location="cpu")
    model.eval()
    folder = out_dir / "test-parity"
    folder.mkdir(exist_ok=True)
    images = {}
    for i, (height, width) in enumerate(TEST_PARITY_IMAGES):
        name = f"img{i}_{height}x{width}.png"
        rgb = synthetic_image(height, width, SEED + 10 + i)
        cv2.imwrite(str(folder / name), np.ascontiguousarray(rgb[..., ::-1]))  # PNG holds RGB; cv2 writes BGR
        images[name] = (height, width)
    window = base["config"]["backbone"]["img_size"][0]
    arrays, runs = {}, []
    cases = [(n, c, t, None) for n, c, t in TEST_PARITY_CONFIGS]
    aug_name, aug_ratios = TEST_PARITY_AUG
    cases += [(f"{n}-aug", c, t, aug_ratios) for n, c, t in TEST_PARITY_CONFIGS if n == aug_name]
    for name, cfg_file, test_cfg_file, ratios in cases:
        pipeline, test_cfg, info = _scaled_test_setup(segvit_repo / cfg_file, test_cfg_file and segvit_repo / test_cfg_file,
                                                      window, ratios)
        model.test_cfg = type(model.test_cfg)(test_cfg)
        run = dict(name=name, config=cfg_file, test_cfg_from=test_cfg_file or cfg_file, **info, images={})
        for image_name in images:
            try:
                labels, near_tie, sizes = _official_test(model, pipeline, folder / image_name)
            except RuntimeError as err:  # a resized short side below the window: non-square windows
                run["images"][image_name] = {"skipped": f"official code fails: {str(err).splitlines()[0][:160]}"}
                continue
            key = f"{name}/{image_name}"
            arrays[f"{key}/labels"], arrays[f"{key}/near_tie"] = labels, near_tie
            run["images"][image_name] = {"resized": sizes, "near_tie_pixels": int(near_tie.sum()),
                                         "pixels": int(labels.size)}
        runs.append(run)
    np.savez_compressed(folder / "labels.npz", **arrays)
    info = dict(
        format="test-parity", model_checkpoint="segvit-v1.pth", model_config=base["config"],
        official_repo={"name": "zbwxp/SegVit", "commit": git_commit(segvit_repo)},
        official_modules=["mmseg 0.24.1 datasets/pipelines (LoadImageFromFile, MultiScaleFlipAug, Resize, RandomFlip, "
                          "Normalize, ImageToTensor, Collect)", "mmseg 0.24.1 EncoderDecoder.forward_test "
                          "(simple_test / aug_test)", "SegVit decode_heads/atm_head.py: ATMHead"],
        images={k: list(v) for k, v in images.items()}, near_tie_margin=TEST_PARITY_TIE, runs=runs,
        arrays="labels.npz: '<run>/<image>/labels' uint8 [H, W] (simple_test or aug_test), "
               "'<run>/<image>/near_tie' bool [H, W]", seed=SEED, versions=versions(),
    )
    (folder / "test-parity.json").write_text(json.dumps(jsonable(info), indent=1) + "\n")

def make_mmseg_vit(out_dir: Path, segvit_repo: Path | None) -> None:
    """A timm ViT converted by the official ``vit2mmseg.convert_vit``; features from mmseg's VisionTransformer."""
    import timm
    from mmseg.models import BACKBONES

    name = "mmseg-vit"
    fx = Fixture(name, out_dir)
    torch.manual_seed(SEED + 20)
    timm_vit = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4, qkv_bias=True,
        num_classes=0, global_pool="token")
    perturb_(timm_vit, SEED + 21)
    timm_state = collections.OrderedDict((k, v.detach().clone()) for k, v in timm_vit.state_dict().items())
    if segvit_repo is not None:
        import importlib

        converter = importlib.import_module("segvit_official.tools.model_converters.vit2mmseg")
        converter_name = "zbwxp/SegVit tools/model_converters/vit2mmseg.py: convert_vit"
    else:
        import importlib.util

        spec = importlib.util.find_spec("mmseg")
        path = Path(list(spec.submodule_search_locations)[0]) / ".mim/tools/model_converters/vit2mmseg.py"
        spec2 = importlib.util.spec_from_file_location("mmseg_vit2mmseg", path)
        converter = importlib.util.module_from_spec(spec2)
        spec2.loader.exec_module(converter)
        converter_name = "mmseg 0.24.1 tools/model_converters/vit2mmseg.py: convert_vit"
    converted = converter.convert_vit(timm_state)
    torch.save(converted, fx.ckpt_path)  # what vit2mmseg.py main() writes: a bare OrderedDict

    height, width = 96, 128
    image = synthetic_image(height, width, SEED + 22)
    norm = IMAGENET_NORM
    x = v0_normalize(image, norm)
    fx.add("image", torch.from_numpy(image), "RGB uint8 [H, W, 3]")
    fx.add("input", x, "normalised input [1, 3, 96, 128] (ImageNet mean/std, to_rgb)")
    base = dict(type="VisionTransformer", img_size=(64, 64), patch_size=16, in_channels=3, embed_dims=64,
                num_layers=4, num_heads=4, mlp_ratio=4, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
                drop_path_rate=0.0, norm_cfg=dict(type="LN", eps=1e-6), interpolate_mode="bicubic",
                out_indices=(1, 3), init_cfg=dict(type="Pretrained", checkpoint=str(fx.ckpt_path)))
    variants = {
        "segvit": dict(with_cls_token=False, final_norm=False),
        "clsfinal": dict(with_cls_token=True, final_norm=True),
        "loadresize": dict(with_cls_token=False, final_norm=False, img_size=(96, 96)),
    }
    descriptions = {
        "segvit": "SegViT's backbone settings: with_cls_token=False, final_norm=False, img_size 64 (pos table 4x4 "
                  "resized bicubic to 6x8 at forward)",
        "clsfinal": "mmseg defaults for a classifier-style ViT: with_cls_token=True (cls token goes through the "
                    "blocks, removed from outputs), final_norm=True (ln1 applied after the LAST block only)",
        "loadresize": "img_size (96, 96): init_weights resizes the 4x4 table to 6x6 when loading (bicubic, "
                      "align_corners=False), the forward resizes 6x6 -> 6x8 again",
    }
    used_cfgs = {}
    for tag, over in variants.items():
        cfg = dict(copy.deepcopy(base), **over)
        used_cfgs[tag] = dict(copy.deepcopy(cfg), init_cfg=dict(type="Pretrained", checkpoint=fx.ckpt_path.name))
        vit = BACKBONES.build(copy.deepcopy(cfg))
        vit.init_weights()
        vit.eval()
        loaded = vit.state_dict()
        for key, value in loaded.items():  # strict check: every tensor came from the file
            if key == "pos_embed" and tag == "loadresize":
                continue
            assert torch.equal(value, converted[key]), (tag, key)
        with torch.no_grad():
            feats = vit(x)
        for idx, feat in zip(cfg["out_indices"], feats):
            fx.add(f"{tag}.feat.{idx}", feat, f"{descriptions[tag]}; output after block {idx} (0-based), NCHW")
        if tag == "loadresize":
            fx.add("loadresize.pos_embed", vit.pos_embed, "the pos_embed after init_weights' load-time resize "
                   "[1, 1 + 6*6, C]")
    with torch.no_grad():
        resized = BACKBONES.build(dict(copy.deepcopy(used_cfgs["segvit"]), init_cfg=None)).resize_pos_embed(
            converted["pos_embed"], (6, 8), (4, 4), "bicubic")
    fx.add("pos_embed_6x8", resized, "VisionTransformer.resize_pos_embed(pos_embed, (6, 8), (4, 4), 'bicubic'): "
           "[1, 1 + 48, C], cls slot first and unchanged")
    info = dict(
        format=name,
        official_repo={"name": "zbwxp/SegVit" if segvit_repo else "open-mmlab/mmsegmentation 0.24.1",
                       "commit": git_commit(segvit_repo)},
        official_modules=[converter_name, "mmseg.models.backbones.vit.VisionTransformer (0.24.1)"],
        checkpoint={"saved_with": "torch.save(convert_vit(timm_state_dict)) as vit2mmseg.py does: a bare "
                    "OrderedDict of tensors (no 'state_dict'/'meta' wrapper)",
                    "source": "convert_vit applied to the state dict of a timm VisionTransformer(img_size=64, "
                              "patch_size=16, embed_dim=64, depth=4, num_heads=4, qkv_bias=True) built here"},
        configs=used_cfgs, img_norm_cfg=norm, input_size=[height, width], seed=SEED,
        notes=["All three variants load the same file; keys not used by a variant (ln1 when final_norm=False) "
               "are ignored by mmseg's non-strict loader."],
    )
    fx.write(info, converted)


def make_mmseg_setr(out_dir: Path) -> None:
    name, num_classes = "mmseg-setr", 6
    norm = IMAGENET_NORM
    bn = dict(type="BN", requires_grad=True)  # SyncBN in the zoo; identical keys and eval-mode maths

    def up_head(in_index, weight):
        return dict(type="SETRUPHead", in_channels=64, channels=32, in_index=in_index, num_classes=num_classes,
                    dropout_ratio=0, norm_cfg=bn, num_convs=1, up_scale=4, kernel_size=1, align_corners=False,
                    loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=weight))

    model_cfg = dict(
        type="EncoderDecoder",
        pretrained=None,
        backbone=dict(type="VisionTransformer", img_size=(64, 64), patch_size=16, in_channels=3, embed_dims=64,
                      num_layers=4, num_heads=4, out_indices=(0, 1, 2, 3), drop_rate=0.1,
                      norm_cfg=dict(type="LN", eps=1e-6, requires_grad=True), with_cls_token=True,
                      interpolate_mode="bilinear"),
        decode_head=up_head(3, 1.0),
        auxiliary_head=[up_head(0, 0.4), up_head(1, 0.4), up_head(2, 0.4)],
        train_cfg=dict(),
        test_cfg=dict(mode="whole"),
    )
    model = v0_build(model_cfg, SEED + 30)
    calibrate_bn_(model, lambda t: [h(model.extract_feat(t)) for h in [model.decode_head, *model.auxiliary_head]],
                  (2, 3, 64, 64), SEED + 31)
    perturb_(model, SEED + 32)
    model.eval()
    fx = Fixture(name, out_dir)
    classes, palette = class_names(num_classes)
    v0_save(model, fx.ckpt_path, v0_train_meta(name, config_text(model=model_cfg, img_norm_cfg=norm), classes,
                                               palette, 80000))
    height, width = 96, 128
    image = synthetic_image(height, width, SEED + 33)
    x = v0_normalize(image, norm)
    fx.add("image", torch.from_numpy(image), "RGB uint8 [H, W, 3]")
    fx.add("input", x, "normalised input [1, 3, 96, 128]")
    metas = v0_metas(height, width)
    with torch.no_grad():
        features = model.extract_feat(x)
        head_logits = model.decode_head(features)
        aux_logits = [h(features) for h in model.auxiliary_head]
        seg_logits = model.encode_decode(x, metas)
        seg_prob = model.inference(x, metas, rescale=True)
    add_backbone_features(fx, features, model_cfg["backbone"]["out_indices"])
    fx.add("decode_head.logits", head_logits, "SETRUPHead output (conv_seg) at 4x the token grid [B, K, 24, 32]")
    for j, logits in enumerate(aux_logits):
        fx.add(f"auxiliary_head.{j}.logits", logits, f"auxiliary SETRUPHead {j} (in_index {j}) output [B, K, 24, 32]")
    fx.add("seg_logits", seg_logits, "EncoderDecoder.encode_decode: decode head logits resized bilinearly "
           "(align_corners=False) to the input [B, K, H, W]")
    assert torch.allclose(seg_prob, seg_logits.softmax(dim=1), atol=1e-6)  # inference = softmax(encode_decode)
    info = dict(
        format=name, official_repo={"name": "open-mmlab/mmsegmentation", "version": "0.24.1 (PyPI wheel)"},
        official_modules=["mmseg VisionTransformer", "mmseg SETRUPHead", "mmseg EncoderDecoder"],
        zoo_config="configs/_base_/models/setr_naive.py scaled down (SyncBN -> BN)",
        config=model_cfg, img_norm_cfg=norm, input_size=[height, width], num_classes=num_classes,
        classes=classes, align_corners=False, seed=SEED,
        checkpoint={"saved_with": "mmcv.runner.save_checkpoint (meta + state_dict, no optimizer)"},
        notes=["setr_naive uses interpolate_mode='bilinear' for the pos-embed resize and with_cls_token=True.",
               "SETRUPHead's input LayerNorm is decode_head.norm (eps 1e-6), applied per token before the convs."],
    )
    fx.write(info, torch.load(fx.ckpt_path, map_location="cpu", weights_only=False)["state_dict"])


def make_mmseg_deeplabv3plus(out_dir: Path) -> None:
    name, num_classes = "mmseg-deeplabv3plus", 6
    norm = IMAGENET_NORM
    bn = dict(type="BN", requires_grad=True)
    model_cfg = dict(
        type="EncoderDecoder",
        pretrained=None,
        backbone=dict(type="ResNetV1c", depth=50, num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                      strides=(1, 2, 1, 1), norm_cfg=bn, norm_eval=False, style="pytorch", contract_dilation=True,
                      stem_channels=32, base_channels=4),
        decode_head=dict(type="DepthwiseSeparableASPPHead", in_channels=128, in_index=3, channels=32,
                         dilations=(1, 12, 24, 36), c1_in_channels=16, c1_channels=12, dropout_ratio=0.1,
                         num_classes=num_classes, norm_cfg=bn, align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        auxiliary_head=dict(type="FCNHead", in_channels=64, in_index=2, channels=16, num_convs=1,
                            concat_input=False, dropout_ratio=0.1, num_classes=num_classes, norm_cfg=bn,
                            align_corners=False,
                            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4)),
        train_cfg=dict(),
        test_cfg=dict(mode="whole"),
    )
    model = v0_build(model_cfg, SEED + 40)
    calibrate_bn_(model, lambda t: [h(f) for f in [model.extract_feat(t)] for h in (model.decode_head,
                                                                                   model.auxiliary_head)],
                  (2, 3, 96, 96), SEED + 41)
    perturb_(model, SEED + 42)
    model.eval()
    fx = Fixture(name, out_dir)
    classes, palette = class_names(num_classes)
    v0_save(model, fx.ckpt_path, v0_train_meta(name, config_text(model=model_cfg, img_norm_cfg=norm), classes,
                                               palette, 80000))
    height, width = 96, 128
    image = synthetic_image(height, width, SEED + 43)
    x = v0_normalize(image, norm)
    fx.add("image", torch.from_numpy(image), "RGB uint8 [H, W, 3]")
    fx.add("input", x, "normalised input [1, 3, 96, 128]")
    metas = v0_metas(height, width)
    head = model.decode_head
    store: dict = {}
    hooks = [capture_outputs(head.bottleneck, store, "aspp"), capture_outputs(head.c1_bottleneck, store, "c1")]
    with torch.no_grad():
        features = model.extract_feat(x)
        head_logits = head(features)
        aux_logits = model.auxiliary_head(features)
        seg_logits = model.encode_decode(x, metas)
        seg_prob = model.inference(x, metas, rescale=True)
    for h in hooks:
        h.remove()
    add_backbone_features(fx, features, [0, 1, 2, 3], prefix="feat.stage")
    fx.add("decode_head.aspp", store["aspp"], "ASPP bottleneck output (image pool + 1x1 + 3 separable dilated "
           "branches, concatenated, 3x3 ConvModule) at stride 8 [B, 32, 12, 16]")
    fx.add("decode_head.c1", store["c1"], "c1_bottleneck (1x1 ConvModule) of stage-0 features at stride 4 "
           "[B, 12, 24, 32]")
    fx.add("decode_head.logits", head_logits, "DepthwiseSeparableASPPHead output at stride 4 [B, K, 24, 32]")
    fx.add("auxiliary_head.logits", aux_logits, "FCNHead (in_index 2) output at stride 8 [B, K, 12, 16]")
    fx.add("seg_logits", seg_logits, "EncoderDecoder.encode_decode: decode logits resized bilinearly "
           "(align_corners=False) to the input [B, K, H, W]")
    assert torch.allclose(seg_prob, seg_logits.softmax(dim=1), atol=1e-6)  # inference = softmax(encode_decode)
    info = dict(
        format=name, official_repo={"name": "open-mmlab/mmsegmentation", "version": "0.24.1 (PyPI wheel)"},
        official_modules=["mmseg ResNetV1c", "mmseg DepthwiseSeparableASPPHead", "mmseg FCNHead"],
        zoo_config="configs/_base_/models/deeplabv3plus_r50-d8.py with small widths (stem_channels=32, "
                   "base_channels=4; the zoo has 64/64) and BN instead of SyncBN",
        config=model_cfg, img_norm_cfg=norm, input_size=[height, width], num_classes=num_classes,
        classes=classes, align_corners=False, seed=SEED,
        checkpoint={"saved_with": "mmcv.runner.save_checkpoint (meta + state_dict, no optimizer)"},
        notes=["BatchNorm running statistics were collected on 3 random batches in train mode, then perturbed.",
               "timm equivalent widths: stem_width = stem_channels/2 = 16, channels=(4, 8, 16, 32) (planes; x4 out)."],
    )
    fx.write(info, torch.load(fx.ckpt_path, map_location="cpu", weights_only=False)["state_dict"])


# ----------------------------------------------------------------------------- MMSegmentation 1.x world (DToP)


DTOP_SCALE = {"class_bias": 4.0, "attn_q_scale": 16.0}  # makes aux heads confident enough for p0 = 0.9
DTOP_INPUT = (128, 128)  # square (the heads need h == w); 8x8 tokens so the top-5-per-class rule lets tokens exit


def make_dtop(out_dir: Path, dtop_repo: Path) -> None:
    official_env.import_mmseg()
    sys.path.insert(0, str(dtop_repo))
    import mmseg_custom  # noqa: F401  (the official repository's package; registers ViT_prune, PruneHead, ...)
    from mmengine.logging import MessageHub
    from mmengine.optim import OptimWrapper
    from mmengine.optim.scheduler import LinearLR, PolyLR
    from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    from mmengine.config import Config
    from mmengine.logging import MMLogger

    register_all_modules(init_default_scope=True)
    quiet_loggers()
    for logger in (MMLogger.get_instance("mmengine"), MMLogger.get_current_instance()):
        logger.setLevel(logging.ERROR)
    name, num_classes, thresh = "dtop", 5, 0.9
    crop = (64, 64)
    data_preprocessor = dict(type="SegDataPreProcessor", mean=IMAGENET_NORM["mean"], std=IMAGENET_NORM["std"],
                             bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=crop)

    def prune_head(t, **extra):
        return dict(type="PruneHead", img_size=64, in_channels=64, channels=32, num_heads=2, num_classes=num_classes,
                    thresh=t, layers_per_decoder=3,
                    loss_decode=dict(type="ATMLoss", num_classes=1, dec_layers=1, **extra.pop("loss", {})), **extra)

    model_cfg = dict(
        type="EncoderDecoderPrune",
        data_preprocessor=data_preprocessor,
        pretrained=None,
        backbone=dict(type="ViT_prune", num_classes=num_classes, img_size=crop, patch_size=16, in_channels=3,
                      embed_dims=64, num_layers=4, num_heads=4, drop_path_rate=0.1, attn_drop_rate=0.0,
                      drop_rate=0.0, out_indices=[1, 2, 3], final_norm=False,
                      norm_cfg=dict(type="LN", eps=1e-6, requires_grad=True), with_cls_token=False,
                      interpolate_mode="bicubic"),
        decode_head=prune_head(1.0, loss=dict(loss_weight=1.0)),
        auxiliary_head=[prune_head(thresh, in_index=0), prune_head(thresh, in_index=1)],
        test_cfg=dict(mode="whole"),
    )
    torch.manual_seed(SEED + 50)
    model = MODELS.build(Config(dict(model=copy.deepcopy(model_cfg))).model)  # as Runner builds it
    model.init_weights()
    perturb_(model, SEED + 51)
    with torch.no_grad():  # confident auxiliary heads so that tokens exit at p0 = 0.9 with random weights
        for aux in model.auxiliary_head:
            aux.class_embed.bias.copy_(torch.tensor([DTOP_SCALE["class_bias"], -DTOP_SCALE["class_bias"]]))
            cross = aux.decoder.layers[-1].multihead_attn
            cross.q.weight.mul_(DTOP_SCALE["attn_q_scale"])
            cross.q.bias.mul_(DTOP_SCALE["attn_q_scale"])
    model.eval()
    fx = Fixture(name, out_dir)

    # --- checkpoint as MMEngine's Runner.save_checkpoint writes it (optimizer state left out for size)
    classes, palette = class_names(num_classes)
    hub = MessageHub.get_instance("dtop_fixture")
    gen = torch.Generator().manual_seed(SEED + 52)
    max_iters = 40000
    for it in range(1, 51):
        hub.update_scalar("train/lr", 2e-5 * it / 50)
        hub.update_scalar("train/loss", float(3.0 - it * 0.01 + torch.rand(1, generator=gen).item() * 0.1))
        hub.update_scalar("train/decode.acc_seg", np.float64(50 + it * 0.2))
        hub.update_scalar("train/time", float(0.5 + torch.rand(1, generator=gen).item()))
    hub.update_info("iter", max_iters)
    hub.update_info("epoch", 0)
    hub.update_info("max_iters", max_iters)
    hub.update_info("dataset_meta", dict(classes=tuple(classes), palette=palette))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.999), weight_decay=0.01)
    wrapper = OptimWrapper(optimizer)
    schedulers = [LinearLR(wrapper, start_factor=1e-6, by_epoch=False, begin=0, end=1500),
                  PolyLR(wrapper, eta_min=0.0, power=0.9, begin=1500, end=max_iters, by_epoch=False)]
    import mmengine

    meta = dict(epoch=0, iter=max_iters, cfg=config_text(model=model_cfg), seed=SEED,
                experiment_name="prune_segvit_fixture", time="20260101_000000",
                mmengine_version=mmengine.__version__, dataset_meta=dict(classes=tuple(classes), palette=palette))
    checkpoint = {"meta": meta, "state_dict": weights_to_cpu(model.state_dict()),
                  "message_hub": hub.state_dict(), "param_schedulers": [s.state_dict() for s in schedulers]}
    save_checkpoint(checkpoint, str(fx.ckpt_path))

    # --- input through the official data preprocessor (BGR uint8 CHW, as mmcv loads images)
    height, width = DTOP_INPUT
    image = synthetic_image(height, width, SEED + 53)
    chw_bgr = torch.from_numpy(np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1)))
    sample = SegDataSample(metainfo=dict(img_shape=(height, width), ori_shape=(height, width),
                                         pad_shape=(height, width), padding_size=[0, 0, 0, 0], flip=False))
    data = model.data_preprocessor(dict(inputs=[chw_bgr], data_samples=[sample]), False)
    x = data["inputs"].float()
    fx.add("image", torch.from_numpy(image), "RGB uint8 [H, W, 3]")
    fx.add("input", x, "SegDataPreProcessor output (bgr_to_rgb, ImageNet mean/std) [1, 3, H, W]")
    metas = [s.metainfo for s in data["data_samples"]]

    # --- official inference, with hooks recording what each prune stage did
    records: list[dict] = []

    def record(tag):
        def hook(module, args, kwargs, output):
            if not kwargs.get("inference", False):
                return
            batch_idx, canvas = output
            records.append(dict(tag=tag, tokens_in=args[0].detach().clone(), exited=batch_idx.detach().clone(),
                                canvas=canvas.detach().clone(),
                                results={k: v.detach().clone() for k, v in module.results.items()}))
        return hook

    hooks = [aux.register_forward_hook(record(f"auxiliary_head.{i}"), with_kwargs=True)
             for i, aux in enumerate(model.auxiliary_head)]
    hooks.append(model.decode_head.register_forward_hook(record("decode_head"), with_kwargs=True))
    with torch.no_grad():
        features = model.extract_feat(x)
        seg_logits = model.inference(x, metas)
        head_pred = model.decode_head(features)
        predicted = model.predict(x, data["data_samples"])
    for h in hooks:
        h.remove()
    records = records[:3]  # the first forward (extract_feat) ran every prune stage once
    grid = (height // 16, width // 16)
    for idx, feature in zip(model_cfg["backbone"]["out_indices"], features):
        fx.add(f"feat.{idx}", feature, f"backbone output after block {idx} (NCHW). Tokens that exited at an earlier "
               "stage are ZERO here (pruned tokens leave the blocks; the layer writes zeros at their positions)")
    previous = torch.zeros(1, grid[0] * grid[1], dtype=torch.bool)
    fractions = []
    for m, rec in enumerate(records):
        tag = rec["tag"]
        exited = rec["exited"]
        newly = exited & ~previous
        fx.add(f"stage{m}.exited", exited.to(torch.uint8), f"{tag}: batch_idx after this stage [B, N] (1 = token has "
               "exited at this or an earlier stage; row-major over the H/16 x W/16 grid)")
        fx.add(f"stage{m}.newly_exited", newly.to(torch.uint8), f"{tag}: tokens that exit at this stage [B, N]")
        fx.add(f"stage{m}.pred_logits", rec["results"]["pred_logits"],
               f"{tag}: binary class logits per query [B, K, 2] (index 0 = class present)")
        fx.add(f"stage{m}.attn", rec["results"]["attn"], f"{tag}: mask-logit canvas [B, K, N]: this head's "
               "attention logits at the tokens it saw, earlier values kept at tokens that had exited")
        fx.add(f"stage{m}.pred", rec["results"]["pred"], f"{tag}: softmax(pred_logits)[..., :1] * sigmoid(attn) "
               "[B, K, N], the per-class token scores the exit rule reads")
        if tag != "decode_head":
            fractions.append(dict(stage=m, head=tag, after_block=model_cfg["backbone"]["out_indices"][m],
                                  exited_now=float(newly.float().mean()), exited_total=float(exited.float().mean())))
        previous = exited
    fx.add("decode_head.pred", head_pred, "PruneHead.forward (inference=False) output: results['pred'] reshaped and "
           "resized bilinearly to (img_size, img_size) [B, K, 64, 64]")
    fx.add("seg_logits", seg_logits, "EncoderDecoder.inference (whole): decode_head.pred resized to img_shape "
           "(bilinear, align_corners=False) [B, K, H, W]; no softmax in mmseg 1.x")
    fx.add("seg_pred", predicted[0].pred_sem_seg.data.to(torch.int64), "model.predict: argmax over classes [1, H, W]")
    assert all(f["exited_now"] > 0 for f in fractions), f"no token exited at some stage: {fractions}"
    info = dict(
        format=name,
        official_repo={"name": "zbwxp/Dynamic-Token-Pruning", "commit": git_commit(dtop_repo)},
        official_modules=["mmseg_custom.backbone.vit_prune.ViT_prune", "mmseg_custom.decode_heads.prune_head."
                          "PruneHead", "mmseg_custom.segmentors.encoder_decoder_prune.EncoderDecoderPrune"],
        released_config="config/prune/prune_segvit_ade20k.py scaled down (aux thresh 0.9, decode thresh 1.0, "
                        "layers_per_decoder 3, depth 12 -> 4, out_indices [5, 7, 11] -> [1, 2, 3])",
        config=model_cfg, input_size=[height, width], num_classes=num_classes, classes=classes,
        align_corners=False, threshold=thresh, exit_rule="max_c pred[c, token] > thresh, then for each class the "
        "(at most) 5 most confident such tokens stay", seed=SEED, weight_adjustment=DTOP_SCALE,
        exit_fractions=fractions,
        final_kept_fraction=float(1 - records[-1]["exited"].float().mean()),
        checkpoint={"saved_with": "mmengine.runner.checkpoint.save_checkpoint of the dict Runner.save_checkpoint "
                    "builds: meta, state_dict, message_hub (MessageHub.state_dict with HistoryBuffer objects), "
                    "param_schedulers; 'optimizer' omitted for size"},
        notes=["DToP's heads reshape token maps with h = w = int(sqrt(N)), so the input is square.",
               "After perturbation each auxiliary head's class_embed bias was set to (+4, -4) and its last "
               "cross-attention q projection (weight and bias) scaled by 16 so that tokens exit with random weights."],
    )
    fx.write(info, checkpoint["state_dict"])


# ----------------------------------------------------------------------------- driver


# ----------------------------------------------------------------------------- optimizer, schedule, one step

OPTIM_CONFIGS = {  # official config -> the reduced model it is applied to (the fixture of that name)
    "configs/segvit/segvit_vit-l_jax_640x640_160k_ade20k.py": "segvit-v1",
    "configs/segvit/segvit_vit-l_jax_480x480_80k_pc.py": "segvit-v1",
    "configs/segvit/segvit_vit-l_jax_512x512_80k_cocostuff10k.py": "segvit-v1",
    "configs/segvit/shrink/segvit_vit-l_jax_shrink8_tpnatm.py": "segvit-v1-shrunk",
}
OPTIM_STEP_ITER = 1000  # the step's iteration: inside the warmup, so the warmup rule is in the update


class _FakeRunner:
    """What mmcv's LrUpdaterHook / OptimizerHook read from an ``IterBasedRunner``."""

    def __init__(self, model, optimizer, max_iters: int):
        self.model, self.optimizer, self.max_iters = model, optimizer, max_iters
        self.iter, self.epoch, self.outputs = 0, 0, {}
        self.logged: dict = {}
        self.log_buffer = type("LogBuffer", (), {"update": lambda _, values, count=1: self.logged.update(values)})()


def _official_fixture_model(out_dir: Path, name: str, drop: bool = True):
    """The reduced official model of fixture ``name`` (its json config) with that fixture's weights;
    ``drop=False`` turns drop-path and every dropout off (deterministic training step)."""
    from mmcv.runner import load_checkpoint

    model_cfg = json.loads((out_dir / f"{name}.json").read_text())["config"]
    if not drop:
        model_cfg["backbone"]["drop_path_rate"] = 0.0
    model = v0_build(model_cfg, SEED)
    load_checkpoint(model, str(out_dir / f"{name}.pth"), map_location="cpu", strict=True)
    if not drop:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.dropout._DropoutNd):
                module.p = 0.0
            if isinstance(module, torch.nn.MultiheadAttention):
                module.dropout = 0.0
    return model, model_cfg


def _official_optimizer(cfg, model):
    from mmcv.runner import build_optimizer

    return build_optimizer(model, copy.deepcopy(dict(cfg.optimizer)))


def _lr_hook(cfg):
    from mmcv.runner.hooks.lr_updater import PolyLrUpdaterHook

    lr_cfg = {k: v for k, v in dict(cfg.lr_config).items() if k != "policy"}
    assert cfg.lr_config["policy"] == "poly"
    return PolyLrUpdaterHook(**lr_cfg)


def _atm_criterion_case(num_classes: int, seed: int) -> dict:
    """Random ATM outputs (3 stages) and labels with ignore pixels for the official ATMLoss."""
    gen = torch.Generator().manual_seed(seed)
    batch, size, grid = 2, 32, 8
    labels = torch.randint(0, num_classes, (batch, size, size), generator=gen)
    labels[0, :, :5] = 255  # an ignored stripe (crop padding)
    labels[1, 20:, :] = 255
    labels[1][labels[1] == 2] = 3  # class 2 absent from image 1
    labels[0, :, 5:][labels[0, :, 5:] == 4] = 255  # class 4 only ignored in image 0
    return {
        "labels": labels,
        "pred_logits": torch.randn(3, batch, num_classes, num_classes + 1, generator=gen) * 2,
        "pred_masks": torch.randn(3, batch, num_classes, grid, grid, generator=gen) * 3,
    }


def make_segvit_optim(out_dir: Path, segvit_repo: Path) -> None:
    """``segvit-optim.json`` + ``segvit-optim_io.pt``: the official optimizer groups, lr schedule,
    ATM loss and one training step (mmcv 1.7 ``build_optimizer`` / ``PolyLrUpdaterHook`` /
    ``OptimizerHook``, mmseg 0.24.1 ``EncoderDecoder.train_step``) on the reduced models of the
    ``segvit-v1`` / ``segvit-v1-shrunk`` fixtures (run those formats first)."""
    from mmcv.runner.hooks.optimizer import OptimizerHook
    from mmcv.utils import Config

    from segvit_official.losses.atm_loss import ATMLoss

    name = "segvit-optim"
    fx = Fixture(name, out_dir)
    configs = {}
    for config_path, model_name in OPTIM_CONFIGS.items():
        cfg = Config.fromfile(str(segvit_repo / config_path))
        model, _ = _official_fixture_model(out_dir, model_name)
        optimizer = _official_optimizer(cfg, model)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                groups[names[id(param)]] = [group["lr"], group["weight_decay"]]
        max_iters = cfg.runner["max_iters"]
        runner = _FakeRunner(model, optimizer, max_iters)
        hook = _lr_hook(cfg)
        hook.before_run(runner)
        probes = {"backbone": "backbone.layers.0.attn.attn.in_proj_weight", "head": "decode_head.q.weight"}
        index = {key: next(i for i, g in enumerate(optimizer.param_groups)
                            if any(names[id(p)] == probe for p in g["params"])) for key, probe in probes.items()}
        schedule = {}
        for it in (0, 1, 1499, 1500, max_iters // 2, max_iters - 1):
            runner.iter = it
            hook.before_train_iter(runner)
            schedule[str(it)] = {key: optimizer.param_groups[i]["lr"] for key, i in index.items()}
        configs[config_path] = dict(
            model=model_name, optimizer=dict(cfg.optimizer), optimizer_config=dict(cfg.optimizer_config),
            lr_config=dict(cfg.lr_config), max_iters=max_iters, samples_per_gpu=cfg.data["samples_per_gpu"],
            params=groups, lr_probes=probes, lr_at=schedule)

    # ATM loss on fixed random outputs (ignore pixels present; a class only ignored; one absent)
    num_classes = 6
    case = _atm_criterion_case(num_classes, SEED + 40)
    criterion = ATMLoss(num_classes=num_classes, dec_layers=3, loss_weight=1.0)
    outputs = {"pred_logits": case["pred_logits"][-1], "pred_masks": case["pred_masks"][-1],
               "aux_outputs": [{"pred_logits": case["pred_logits"][i], "pred_masks": case["pred_masks"][i]}
                               for i in range(2)]}
    with torch.no_grad():
        atm_losses = {k: float(v) for k, v in criterion(outputs, case["labels"], ignore_index=255).items()}
    for key in ("labels", "pred_logits", "pred_masks"):
        fx.add(f"atm.{key}", case[key], f"ATM loss input {key} (stacked over the 3 stages, last = final)")

    # one training step of the ADE20K config on the reduced SegViT (dropout / drop-path off)
    step_config = "configs/segvit/segvit_vit-l_jax_640x640_160k_ade20k.py"
    cfg = Config.fromfile(str(segvit_repo / step_config))
    model, model_cfg = _official_fixture_model(out_dir, "segvit-v1", drop=False)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    height = width = 64
    images = torch.cat([v0_normalize(synthetic_image(height, width, SEED + 41 + i), JAX_NORM) for i in range(2)])
    gen = torch.Generator().manual_seed(SEED + 43)
    labels = torch.randint(0, num_classes, (2, height // 8, width // 8), generator=gen)
    labels = labels.repeat_interleave(8, 1).repeat_interleave(8, 2)
    labels[0, :, 56:] = 255  # padding-like ignored border
    labels[1, :3] = 255
    metas = v0_metas(height, width) * 2
    optimizer = _official_optimizer(cfg, model)
    runner = _FakeRunner(model, optimizer, cfg.runner["max_iters"])
    lr_hook = _lr_hook(cfg)
    lr_hook.before_run(runner)
    runner.iter = OPTIM_STEP_ITER
    lr_hook.before_train_iter(runner)
    model.train()
    outputs = model.train_step(dict(img=images, img_metas=metas, gt_semantic_seg=labels[:, None]), optimizer)
    runner.outputs = outputs
    grads: dict = {}

    def capture(opt, _args, _kwargs):
        for n, p in model.named_parameters():
            if p.grad is not None:
                grads[n] = p.grad.detach().clone()

    handle = optimizer.register_step_pre_hook(capture)
    OptimizerHook(grad_clip=dict(cfg.optimizer_config["grad_clip"])).after_train_iter(runner)
    handle.remove()
    after = dict(model.named_parameters())
    fx.add("step.images", images, "normalised input batch [2, 3, 64, 64] (jax mean/std 127.5)")
    fx.add("step.labels", labels, "labels [2, 64, 64] (8x8 blocks, 255 = ignore)")
    for n in before:
        fx.add(f"step.update.{n}", after[n].detach() - before[n], "parameter after the step minus before")
    grad_stats = {n: [float(g.norm()), float(g.sum())] for n, g in grads.items()}

    # clipping exercised: the same gradients through OptimizerHook with max_norm = half their norm
    total = float(torch.norm(torch.stack([g.norm() for g in grads.values()])))
    clip_norm = total / 2
    for n, p in model.named_parameters():
        p.grad = grads[n].clone() if n in grads else None
    OptimizerHook(grad_clip=dict(max_norm=clip_norm, norm_type=2)).clip_grads(model.parameters())
    clipped_stats = {n: [float(p.grad.norm()), float(p.grad.sum())] for n, p in model.named_parameters()
                     if p.grad is not None}

    info = dict(
        format=name,
        official_repo={"name": "zbwxp/SegVit", "commit": git_commit(segvit_repo)},
        official_modules=["mmcv 1.7.2 runner/optimizer/default_constructor.py DefaultOptimizerConstructor",
                          "mmcv 1.7.2 runner/hooks/lr_updater.py PolyLrUpdaterHook",
                          "mmcv 1.7.2 runner/hooks/optimizer.py OptimizerHook",
                          "mmseg 0.24.1 EncoderDecoder.train_step", "SegVit losses/atm_loss.py ATMLoss"],
        configs=configs,
        atm_loss=dict(num_classes=num_classes, ignore_index=255, losses=atm_losses),
        step=dict(config=step_config, model="segvit-v1", iteration=OPTIM_STEP_ITER,
                  deterministic="backbone drop_path_rate 0; every nn.Dropout p = 0 and nn.MultiheadAttention "
                                "dropout 0 (head's TransformerDecoderLayer default 0.1)",
                  log_vars={k: float(v) for k, v in outputs["log_vars"].items()},
                  grad_norm=runner.logged.get("grad_norm"), grad_stats=grad_stats,
                  clip_test=dict(max_norm=clip_norm, total_norm=total, clipped_stats=clipped_stats)),
        seed=SEED,
    )
    torch.save(fx.tensors, out_dir / f"{name}_io.pt")
    info["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                           "description": fx.descriptions[k]} for k, v in fx.tensors.items()}
    info["versions"] = versions()
    with open(out_dir / f"{name}.json", "w") as handle:
        json.dump(jsonable(info), handle, indent=1)
        handle.write("\n")


# ----------------------------------------------------------------------------- train pipeline (mmseg 0.24.1)

TRAIN_PIPELINE_SEEDS = range(6)


def _train_pipeline_cases() -> list[dict]:
    """Scaled-down copies of the official train pipelines (SegViT ``configs/_base_/datasets``).

    ``ade``: ADE20K's ``Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0))`` at 3/32 with a
    48x48 crop, ``reduce_zero_label``, jax normalisation; ``pc``: Pascal Context's square scale on
    a portrait image, no label reduction, ImageNet normalisation; ``dominant``: one class covers
    most of the label, so ``cat_max_ratio`` retries (and sometimes exhausts them).
    """
    def pipeline(scale, crop, reduce_zero_label, norm):
        return [dict(type="LoadImageFromFile"),
                dict(type="LoadAnnotations", reduce_zero_label=reduce_zero_label),
                dict(type="Resize", img_scale=scale, ratio_range=(0.5, 2.0)),
                dict(type="RandomCrop", crop_size=crop, cat_max_ratio=0.75),
                dict(type="RandomFlip", prob=0.5),
                dict(type="PhotoMetricDistortion"),
                dict(type="Normalize", **norm),
                dict(type="Pad", size=crop, pad_val=0, seg_pad_val=255)]

    return [dict(name="ade", size=(48, 72), classes=6, pipeline=pipeline((192, 48), (48, 48), True, JAX_NORM)),
            dict(name="pc", size=(64, 48), classes=5, pipeline=pipeline((56, 56), (48, 48), False, IMAGENET_NORM)),
            dict(name="dominant", size=(48, 72), classes=3,
                 pipeline=pipeline((72, 48), (40, 40), True, IMAGENET_NORM))]


def _train_pipeline_label(case: dict, seed: int) -> np.ndarray:
    """A uint8 label of 8x8 blocks (ids ``0..classes-1``) with an ignored (255) stripe."""
    height, width = case["size"]
    gen = np.random.RandomState(seed + 1000)
    if case["name"] == "dominant":
        label = np.ones((height, width), np.uint8)  # class 1 (0 after reduce_zero_label) dominates
        label[8:24, 44:64] = 2
    else:
        blocks = gen.randint(0, case["classes"], size=(height // 8 + 1, width // 8 + 1)).astype(np.uint8)
        label = np.kron(blocks, np.ones((8, 8), np.uint8))[:height, :width]
    label[:, 5:9] = 255
    return label


def _record_photometric_substeps(transform, substeps: list) -> None:
    """Wrap one ``PhotoMetricDistortion``'s steps to append ``(name, RGB output)`` of each applied one."""
    for name in ("brightness", "contrast", "saturation", "hue"):
        def call(img, _method=getattr(transform, name), _name=name):
            out = _method(img)
            if out is not img:  # a skipped step returns its input
                substeps.append((_name, np.ascontiguousarray(out[..., ::-1])))
            return out
        setattr(transform, name, call)


def make_train_pipeline(out_dir: Path) -> None:
    """Run MMSegmentation 0.24.1's train transforms one by one and record every random draw.

    The module-level ``numpy.random`` functions the transforms call (``random_sample``,
    ``randint``, ``rand``, ``uniform``) are wrapped to log ``(function, args, value)``; the
    image (as RGB; mmseg holds BGR until ``Normalize(to_rgb=True)``) and label after each step
    are stored, so a test can feed the same draws to segcli step by step; so is the output of
    each photometric step that applied (brightness, contrast, saturation, hue), in call order.
    """
    import tempfile

    import cv2
    from mmseg.datasets.pipelines import Compose

    names = ["random_sample", "randint", "rand", "uniform"]
    originals = {name: getattr(np.random, name) for name in names}
    log: list = []

    def logged(name):
        def call(*args):
            value = originals[name](*args)
            log.append({"fn": name, "args": [jsonable(a) for a in args], "value": jsonable(value)})
            return value
        return call

    arrays, samples = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            setattr(np.random, name, logged(name))
        try:
            for case_index, case in enumerate(_train_pipeline_cases()):
                transforms = Compose(copy.deepcopy(case["pipeline"])).transforms
                substeps: list = []
                _record_photometric_substeps(transforms[[c["type"] for c in case["pipeline"]].index(
                    "PhotoMetricDistortion")], substeps)
                for index in TRAIN_PIPELINE_SEEDS:
                    key, seed = f"{case['name']}{index}", SEED + 10 * case_index + index
                    image = synthetic_image(*case["size"], seed=seed)
                    raw_label = _train_pipeline_label(case, seed)
                    image_path, label_path = Path(tmp) / f"{key}.png", Path(tmp) / f"{key}_label.png"
                    cv2.imwrite(str(image_path), image[..., ::-1])  # files hold BGR
                    cv2.imwrite(str(label_path), raw_label)
                    arrays[f"{key}/input/img"], arrays[f"{key}/input/label"] = image, raw_label
                    results = dict(img_info=dict(filename=str(image_path)), ann_info=dict(seg_map=str(label_path)),
                                   img_prefix=None, seg_prefix=None, seg_fields=[])
                    np.random.seed(seed)
                    steps = []
                    substeps.clear()
                    for cfg, transform in zip(case["pipeline"], transforms):
                        log.clear()
                        results = transform(results)
                        step = cfg["type"]
                        img = results["img"]
                        if img.dtype == np.uint8:
                            img = img[..., ::-1]  # BGR -> RGB for comparison with segcli
                        if step not in ("LoadImageFromFile", "LoadAnnotations", "Normalize"):
                            # (the loaded image is the input; Normalize's output is Pad's top-left)
                            arrays[f"{key}/{step}/img"] = np.ascontiguousarray(img)
                        if "gt_semantic_seg" in results:  # from LoadAnnotations on
                            arrays[f"{key}/{step}/label"] = results["gt_semantic_seg"]
                        steps.append({"type": step, "draws": copy.deepcopy(log),
                                      "scale": jsonable(results.get("scale")) if step == "Resize" else None})
                    for position, (name, img) in enumerate(substeps[:-1]):  # the last one is the step's output
                        arrays[f"{key}/PhotoMetricDistortion/{position}-{name}/img"] = img
                    samples.append({"key": key, "case": case["name"], "seed": seed, "steps": steps,
                                    "photometric_substeps": [name for name, _ in substeps]})
        finally:
            for name, fn in originals.items():
                setattr(np.random, name, fn)
    np.savez_compressed(out_dir / "train-pipeline.npz", **arrays)
    meta = {"versions": {**versions(), "opencv": cv2.__version__},
            "source": "mmseg/datasets/pipelines/{loading,transforms}.py (mmseg 0.24.1)",
            "cases": [{k: jsonable(v) for k, v in case.items()} for case in _train_pipeline_cases()],
            "samples": samples}
    (out_dir / "train-pipeline.json").write_text(json.dumps(meta, indent=1) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segvit-repo", type=Path, help="checkout of zbwxp/SegVit")
    parser.add_argument("--dtop-repo", type=Path, help="checkout of zbwxp/Dynamic-Token-Pruning")
    parser.add_argument("--mmseg1-path", type=Path, help="folder with mmcv-lite 2.x, mmengine, mmsegmentation 1.x "
                        "(put first on PYTHONPATH for the dtop child process)")
    parser.add_argument("--formats", default=",".join(V0_FORMATS + TEST_FORMATS + V1_FORMATS))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/official")
    parser.add_argument("--in-mmseg1", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(V0_FORMATS + TEST_FORMATS + V1_FORMATS))
    if unknown:
        parser.error(f"unknown formats {unknown}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.in_mmseg1:
        make_dtop(args.out, args.dtop_repo)
        return
    v0 = [f for f in formats if f in V0_FORMATS + TEST_FORMATS]
    if v0:
        if any(f.startswith("segvit") or f in TEST_FORMATS for f in v0) and args.segvit_repo is None:
            parser.error("segvit formats need --segvit-repo")
        v0_setup(args.segvit_repo)
        makers = {"test-parity": lambda: make_test_parity(args.out, args.segvit_repo),
                  "segvit-v1": lambda: make_segvit_v1(args.out, args.segvit_repo),
                  "segvit-v1-shrunk": lambda: make_segvit_v1_shrunk(args.out, args.segvit_repo),
                  "mmseg-vit": lambda: make_mmseg_vit(args.out, args.segvit_repo),
                  "mmseg-setr": lambda: make_mmseg_setr(args.out),
                  "mmseg-deeplabv3plus": lambda: make_mmseg_deeplabv3plus(args.out),
                  "train-pipeline": lambda: make_train_pipeline(args.out),
                  "segvit-optim": lambda: make_segvit_optim(args.out, args.segvit_repo)}
        for fmt in v0:
            makers[fmt]()
            print(f"wrote {fmt}")
    if "dtop" in formats:
        if args.dtop_repo is None or args.mmseg1_path is None:
            parser.error("dtop needs --dtop-repo and --mmseg1-path")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(args.mmseg1_path), os.environ.get("PYTHONPATH", "")]))
        subprocess.run([sys.executable, __file__, "--in-mmseg1", "--dtop-repo", str(args.dtop_repo),
                        "--out", str(args.out), "--formats", "dtop"], env=env, check=True)
        print("wrote dtop")


if __name__ == "__main__":
    main()
