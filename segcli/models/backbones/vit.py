"""Plain ViT backbones from timm (ViT, DeiT3, BEiT/BEiTv2) with block-level access.

Conventions every head and wrapper relies on (decisions of this project): tokens are patches
only (the cls token is dropped before the blocks and deleted from the module, so DDP sees no
unused parameter; ``cls_token: true`` keeps it through the blocks for models trained that way);
no final norm on the features fed to heads; absolute position embeddings are resized to the
input grid on the fly (``pos_embed_resize``: timm's antialiased bicubic, or MMSegmentation's plain
bicubic / bilinear); features are taken after the given 0-based blocks and returned as NCHW maps
``[B, C, H/p, W/p]``.

The blocks are run by :func:`block_forward` rather than timm's ``Block.forward`` so that one
code path serves the plain model, Shrunk (a query subset: ``query_index``) and DToP (variable
token sets padded per image: ``key_padding_mask``, with ``positions`` for BEiT's relative
position bias). It reads the timm block's own parameters, so pretrained weights are used
unchanged. Supported blocks: timm ``vision_transformer.Block`` (ViT, DeiT3) and ``beit.Block``.

BEiT's relative position bias table is learnt for the window it was built with (the recipe's
``img_size``); for another grid the table is resized bilinearly (decision: simple, differentiable,
and exact when the grid matches, which it does for the thesis' crop-sized inference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from ...configurable import NonNegativeInt, PositiveInt, UnitFloat
from ...errors import SegcliError
from ...registry import BACKBONES
from ..base import Backbone
from .weights import load_state_dict_file, mmseg_vit_to_timm, resolve_weights


@dataclass(frozen=True)
class ViTConfig:
    name: str = "vit_base_patch16_384"  # any timm ViT / DeiT3 / BEiT name
    out_indices: tuple[NonNegativeInt, ...] = (5, 7, 11)  # 0-based blocks whose outputs are returned
    img_size: PositiveInt = 512  # the size the position embeddings / rel-pos tables are built for
    pretrained: str | None = None  # timm-format weights: a local file (.pth/.pt/.bin/.safetensors/.npz, or a segcli checkpoint), timm:NAME or a URL
    drop_path_rate: UnitFloat = 0.1
    patch_size: PositiveInt | None = None  # None = the timm model's; another value only for training from scratch
    depth: PositiveInt | None = None  # None = the timm model's; fewer blocks only for training from scratch
    embed_dim: PositiveInt | None = None  # None = the timm model's (other widths: small test models, converted ones)
    num_heads: PositiveInt | None = None  # None = the timm model's
    # how absolute position embeddings are resized to another grid: "timm" = timm's
    # resample_abs_pos_embed (antialiased bicubic), "bicubic" = plain bicubic, align_corners=False,
    # as MMSegmentation's VisionTransformer does (models trained there need it)
    # (and "bilinear", align_corners=False: MMSegmentation's SETR configs)
    pos_embed_resize: Literal["timm", "bicubic", "bilinear"] = "timm"
    # keep the cls token through the blocks (MMSegmentation's with_cls_token=True, e.g. its SETR);
    # the features stay patch tokens. Plain encoder-decoders only: the block-level API that
    # DToP and Shrunk drive works on patch tokens, so it refuses such a backbone.
    cls_token: bool = False


def _qkv(attn: nn.Module, x: torch.Tensor, query_index: torch.Tensor | None = None):
    """q, k, v ``[B, heads, N, d]`` from a timm attention module's own weights.

    With ``query_index`` [B, Nq] only those tokens are projected to queries (q is then
    ``[B, heads, Nq, d]``): QD's saving starts at the query projection, as in the released code.
    """
    batch, num_tokens, _ = x.shape
    bias = _qkv_bias(attn)
    if query_index is None:
        return _split_qkv(attn, F.linear(x, attn.qkv.weight, bias))
    else:
        width = attn.qkv.weight.shape[0] // 3
        x_query = torch.gather(x, 1, query_index[..., None].expand(-1, -1, x.shape[-1]))  # [B, Nq, C]
        q = F.linear(x_query, attn.qkv.weight[:width], None if bias is None else bias[:width])
        q = q.reshape(batch, -1, attn.num_heads, width // attn.num_heads).transpose(1, 2)  # [B, h, Nq, d]
        kv = F.linear(x, attn.qkv.weight[width:], None if bias is None else bias[width:])
        kv = kv.reshape(batch, num_tokens, 2, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # [2, B, h, N, d]
        k, v = kv.unbind(0)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def _qkv_bias(attn: nn.Module) -> torch.Tensor | None:
    if getattr(attn, "q_bias", None) is not None:  # BEiT: q and v biases, zero k bias
        return torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
    return attn.qkv.bias


def _split_qkv(attn: nn.Module, qkv: torch.Tensor):
    """``[B, N, 3C]`` projections -> q, k, v ``[B, heads, N, d]`` (q/k norms applied where the model has them)."""
    batch, num_tokens, _ = qkv.shape
    q, k, v = qkv.reshape(batch, num_tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, N, d] each
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


RAGGED_MIN_PADDING = 0.1  # padded share of a batch above which the per-token layers skip the padding


def rel_pos_bias(attn: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """BEiT relative position bias for patch tokens of ``grid``: ``[heads, h*w, h*w]``."""
    win_h, win_w = attn.window_size
    heads = attn.num_heads
    table = attn.relative_position_bias_table[:-3]  # drop the 3 cls-token entries
    table = table.t().reshape(1, heads, 2 * win_h - 1, 2 * win_w - 1)  # [1, h, 2Wh-1, 2Ww-1]
    gh, gw = grid
    if (gh, gw) != (win_h, win_w):
        table = F.interpolate(table, size=(2 * gh - 1, 2 * gw - 1), mode="bilinear", align_corners=True)
    table = table[0].flatten(1)  # [heads, (2gh-1)(2gw-1)]
    ys, xs = torch.meshgrid(torch.arange(gh, device=table.device), torch.arange(gw, device=table.device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    index = (ys[:, None] - ys[None, :] + gh - 1) * (2 * gw - 1) + (xs[:, None] - xs[None, :] + gw - 1)  # [N, N]
    return table[:, index]  # [heads, N, N]


def block_forward(
    block: nn.Module,
    tokens: torch.Tensor,
    grid: tuple[int, int],
    *,
    key_padding_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """One pre-norm transformer block on ``tokens`` [B, N, C].

    ``key_padding_mask`` [B, N] (True = padding) hides padded tokens from attention. In eval
    mode, when a tenth or more of the slots are padding (DToP batches whose images kept different token
    counts), the per-token layers (norms, qkv, output projection, MLP) run on the real tokens
    only, gathered into one ``[T, C]`` matrix; attention then runs image by image on each one's
    own tokens when the padding is at the end of each row (``select_tokens``' layout) and there is
    no relative position bias, else on the padded ``[B, N]`` layout with the mask. Padding slots
    of the output are zero then (they are never read: the mask hides them).
    ``positions`` [B, N] are the tokens' flat grid indices (needed for relative position bias
    when the tokens are a subset of the grid). ``query_index`` [B, Nq] selects the tokens that
    act as queries (Shrunk's QD); the output then has Nq tokens and the residual is taken from
    those tokens.
    """
    attn = block.attn
    batch, num_tokens, width = tokens.shape
    real = None  # ragged: the flat indices [T] of the real (unpadded) tokens
    # inference only: in training, drop-path on a [T, C] matrix would drop tokens, not samples
    if key_padding_mask is not None and query_index is None and not block.training and \
            float(key_padding_mask.float().mean()) >= RAGGED_MIN_PADDING:
        real = (~key_padding_mask).flatten().nonzero().squeeze(1)  # [T]
        residual = tokens.reshape(-1, width).index_select(0, real)  # [T, C]
        projected = F.linear(block.norm1(residual), attn.qkv.weight, _qkv_bias(attn))  # [T, 3C]
        lengths = _front_packed_lengths(key_padding_mask)
        if lengths is not None and getattr(attn, "relative_position_bias_table", None) is None:
            out = _attention_per_image(attn, projected, lengths)  # [T, C]
            return _block_tail(block, attn, residual, out, real, batch, num_tokens)
        padded = projected.new_zeros(batch * num_tokens, projected.shape[-1]).index_copy_(0, real, projected)
        q, k, v = _split_qkv(attn, padded.view(batch, num_tokens, -1))  # [B, h, N, d] each, padding zero
    else:
        q, k, v = _qkv(attn, block.norm1(tokens), query_index)  # q [B, h, Nq, d], k/v [B, h, N, d]
        residual = tokens
    q_positions = positions
    if query_index is not None:
        residual = torch.gather(tokens, 1, query_index[..., None].expand(-1, -1, tokens.shape[-1]))  # [B, Nq, C]
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        q_positions = torch.gather(positions, 1, query_index)
    bias = None
    if getattr(attn, "relative_position_bias_table", None) is not None:
        bias = rel_pos_bias(attn, grid)[None]  # [1, h, N, N]
        if positions is not None:
            rows = bias.expand(tokens.shape[0], -1, -1, -1)
            rows = torch.gather(rows, 2, q_positions[:, None, :, None].expand(-1, rows.shape[1], -1, rows.shape[3]))
            bias = torch.gather(rows, 3, positions[:, None, None, :].expand(-1, rows.shape[1], rows.shape[2], -1))
    if key_padding_mask is not None:
        pad = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
        pad = pad.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]  # [B, 1, 1, N]
        bias = pad if bias is None else bias.to(q.dtype) + pad
    elif bias is not None:
        bias = bias.to(q.dtype)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)  # [B, h, Nq, d]
    out = out.transpose(1, 2).flatten(2)  # [B, Nq, h*d]
    if real is not None:
        out = out.reshape(-1, out.shape[-1]).index_select(0, real)  # [T, h*d]
    return _block_tail(block, attn, residual, out, real, batch, num_tokens)


def _front_packed_lengths(key_padding_mask: torch.Tensor) -> list[int] | None:
    """Each row's real-token count if every row's padding is at its end (``select_tokens``' layout), else None."""
    counts = (~key_padding_mask).sum(1)  # [B]
    slots = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device)
    if not torch.equal(key_padding_mask, slots[None, :] >= counts[:, None]):
        return None
    return counts.tolist()


def _attention_per_image(attn: nn.Module, projected: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Attention of each image's own tokens alone: ``projected`` [T, 3C] (images one after the
    other, ``lengths`` tokens each) -> [T, C]. No padding and no mask: a masked SDPA call on a
    padded batch costs the padding and runs slower per element on CPU. Eval mode only (no dropout)."""
    outs = []
    for part in projected.split(lengths):  # [m, 3C] per image
        if part.shape[0] == 0:
            outs.append(part[:, : part.shape[1] // 3])
            continue
        q, k, v = _split_qkv(attn, part[None])  # [1, h, m, d] each
        outs.append(F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1).flatten(1))  # [m, C]
    return torch.cat(outs)


def _block_tail(block, attn, residual, out, real, batch: int, num_tokens: int) -> torch.Tensor:
    """Output projection, residuals, MLP; ``real`` set: rows are the real tokens, scattered back to [B, N, C]."""
    if hasattr(attn, "norm"):
        out = attn.norm(out)
    out = attn.proj_drop(attn.proj(out))
    if getattr(block, "gamma_1", None) is not None:  # BEiT layer scale
        x = residual + block.drop_path1(block.gamma_1 * out)
        x = x + block.drop_path2(block.gamma_2 * block.mlp(block.norm2(x)))
    else:
        ls1 = getattr(block, "ls1", nn.Identity())
        ls2 = getattr(block, "ls2", nn.Identity())
        x = residual + block.drop_path1(ls1(out))
        x = x + block.drop_path2(ls2(block.mlp(block.norm2(x))))
    if real is not None:  # back to [B, N, C]; padding slots are zero
        x = x.new_zeros(batch * num_tokens, x.shape[-1]).index_copy_(0, real, x).view(batch, num_tokens, -1)
    return x


class ViTBackbone(Backbone):
    """A timm plain ViT exposing ``embed`` / ``run_block`` / ``tokens_to_map`` for wrappers."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        try:
            extra = {"patch_size": cfg.patch_size} if cfg.patch_size else {}
            for key in ("depth", "embed_dim", "num_heads"):
                if getattr(cfg, key):
                    extra[key] = getattr(cfg, key)
            vit = timm.create_model(cfg.name, pretrained=False, num_classes=0, img_size=cfg.img_size,
                                    drop_path_rate=cfg.drop_path_rate, **extra)
        except RuntimeError as err:
            raise SegcliError(f"timm has no model '{cfg.name}'", "model.backbone.name",
                              "see timm.list_models('vit*')") from err
        except TypeError as err:
            raise SegcliError(f"'{cfg.name}' is not a plain ViT: {err}", "model.backbone.name") from err
        if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
            raise SegcliError(f"'{cfg.name}' is not a plain ViT", "model.backbone.name", "use a vit_/deit3_/beit* model")
        self.depth = len(vit.blocks)
        if cfg.cls_token and getattr(vit.blocks[0].attn, "relative_position_bias_table", None) is not None:
            raise SegcliError("cls_token: true is for absolute-position ViTs, not BEiT", "model.backbone.cls_token")
        for index in cfg.out_indices:
            if not 0 <= index < self.depth:
                raise SegcliError(f"block {index} does not exist ({cfg.name} has {self.depth})",
                                  "model.backbone.out_indices")
        # Patch tokens only: the prefix (cls/register) slots of the position embedding stay in the
        # tensor (so timm checkpoints load unchanged) but are never added to anything.
        self.num_prefix_pos = 0 if getattr(vit, "no_embed_class", False) else getattr(vit, "num_prefix_tokens", 1)
        for name in ("reg_token",) if cfg.cls_token else ("cls_token", "reg_token"):
            if getattr(vit, name, None) is not None:
                delattr(vit, name)
                setattr(vit, name, None)
        for name in ("norm", "fc_norm", "head", "head_drop", "attn_pool"):
            if hasattr(vit, name):
                setattr(vit, name, nn.Identity())
        self.vit = vit
        self.cfg = cfg
        self.embed_dim = vit.embed_dim if hasattr(vit, "embed_dim") else vit.num_features
        self.patch_size = vit.patch_embed.patch_size[0]
        self.base_grid = tuple(vit.patch_embed.grid_size)
        self.out_indices = tuple(cfg.out_indices)
        self.out_channels = tuple(self.embed_dim for _ in self.out_indices)
        self.out_strides = tuple(self.patch_size for _ in self.out_indices)
        self.size_divisor = self.patch_size
        # mmseg's ViT pads inside its patch embedding (AdaptivePadding, 'corner') and EncoderDecoder
        # resizes the padded grid's scores, padding included, to the input size: the engine does too
        self.resize_padded_scores = True
        if cfg.pretrained:
            self.load_pretrained(cfg.pretrained)

    # ------------------------------------------------------------------ block-level API
    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images [B, 3, H, W] -> patch tokens [B, h*w, C] with position embeddings, and (h, w)."""
        if self.cfg.cls_token:
            raise SegcliError("a ViT that keeps its cls token has no patch-token-only block API", "model.backbone.cls_token",
                              "DToP and Shrunk need cls_token: false")
        return self._patch_tokens(images)

    def _patch_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.vit.patch_embed.proj(images)  # [B, C, h, w]
        grid = (x.shape[2], x.shape[3])
        # [B, h*w, C], made contiguous: a transposed view would pass its strides on through every
        # residual add, and each LayerNorm of every block would copy it again (timm's PatchEmbed does)
        x = x.flatten(2).transpose(1, 2).contiguous()
        x = self.vit.patch_embed.norm(x)
        pos = getattr(self.vit, "pos_embed", None)
        if pos is not None:
            pos = pos[:, self.num_prefix_pos:]  # [1, h0*w0, C]
            if grid != self.base_grid:
                pos = self._resize_pos_embed(pos, grid)
            x = x + pos
        x = self.vit.pos_drop(x) if hasattr(self.vit, "pos_drop") else x
        if hasattr(self.vit, "norm_pre"):
            x = self.vit.norm_pre(x)
        return x, grid

    def _resize_pos_embed(self, pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch position embeddings ``[1, h0*w0, C]`` of the base grid -> ``[1, h*w, C]`` of ``grid``."""
        if self.cfg.pos_embed_resize == "timm":
            return resample_abs_pos_embed(pos, list(grid), old_size=list(self.base_grid), num_prefix_tokens=0)
        h0, w0 = self.base_grid
        table = pos.reshape(1, h0, w0, -1).permute(0, 3, 1, 2)  # [1, C, h0, w0]
        table = F.interpolate(table, size=grid, mode=self.cfg.pos_embed_resize, align_corners=False)  # [1, C, h, w]
        return table.flatten(2).transpose(1, 2)  # [1, h*w, C]

    def run_block(self, index: int, tokens: torch.Tensor, grid: tuple[int, int], **kwargs) -> torch.Tensor:
        return block_forward(self.vit.blocks[index], tokens, grid, **kwargs)

    @staticmethod
    def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[B, h*w, C] -> [B, C, h, w]."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid[0], grid[1])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        tokens, grid = self._patch_tokens(images)  # [B, h*w, C]
        prefix = 0
        if self.cfg.cls_token:  # MMSegmentation's with_cls_token: the cls token (+ its position) runs along
            cls = self.vit.cls_token + self.vit.pos_embed[:, :1]  # [1, 1, C]
            tokens = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # [B, 1 + h*w, C]
            prefix = 1
        features = []
        last = max(self.out_indices)
        for index in range(last + 1):
            tokens = self.run_block(index, tokens, grid)
            if index in self.out_indices:
                features.append(self.tokens_to_map(tokens[:, prefix:], grid))
        return [features[sorted(self.out_indices).index(i)] for i in self.out_indices]

    # ------------------------------------------------------------------ optimisation helpers
    @property
    def num_layers(self) -> int:
        return self.depth + 2

    def layer_id(self, param_name: str) -> int:
        name = param_name.removeprefix("vit.")
        if name.startswith(("pos_embed", "patch_embed", "cls_token", "reg_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1

    def no_weight_decay_names(self) -> set[str]:
        names = {"vit.pos_embed"}
        names |= {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n or n.endswith("gamma_1")
                  or n.endswith("gamma_2")}
        return names

    # ------------------------------------------------------------------ weights
    def load_pretrained(self, path: str) -> None:
        """Load timm-format weights (a local file, ``timm:NAME`` or a URL: :func:`resolve_weights`);
        cls token dropped, position tables resized."""
        file = resolve_weights(path)
        if file.suffix == ".npz":
            if not hasattr(self.vit, "load_pretrained"):
                raise SegcliError(".npz weights only load into timm VisionTransformer models", str(file))
            self.vit.load_pretrained(str(file))
            return
        state = load_state_dict_file(file)
        if any(k.startswith("backbone.vit.") for k in state):  # a segcli checkpoint: its encoder only
            state = {k.removeprefix("backbone.vit."): v for k, v in state.items() if k.startswith("backbone.vit.")}
        state = {k.removeprefix("module.").removeprefix("backbone.").removeprefix("encoder."): v for k, v in state.items()}
        if "patch_embed.projection.weight" in state:  # MMSegmentation's VisionTransformer (vit2mmseg.py format)
            state = mmseg_vit_to_timm(state)
        if not self.cfg.cls_token:
            state.pop("cls_token", None)
        state.pop("reg_token", None)
        module = __import__(type(self.vit).__module__, fromlist=["checkpoint_filter_fn"])
        if hasattr(module, "checkpoint_filter_fn"):  # position tables resized to img_size by pos_embed_resize
            plain = {} if self.cfg.pos_embed_resize == "timm" else {"interpolation": self.cfg.pos_embed_resize,
                                                                      "antialias": False}
            state = module.checkpoint_filter_fn(state, self.vit, **plain)
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", "norm.", "cls_token"))}
        own = self.vit.state_dict()
        shape_bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        if shape_bad:
            raise SegcliError(f"weights do not fit {self.cfg.name}: shape mismatch in {shape_bad[:3]}", str(file),
                              "use weights of the same architecture as model.backbone.name")
        result = self.vit.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(("relative_position_index", "k_bias"))]
        if missing:
            raise SegcliError(f"weights miss {len(missing)} tensors of {self.cfg.name}, e.g. {missing[:3]}", str(file),
                              "use weights of the same architecture as model.backbone.name")


@BACKBONES.register("vit", ViTConfig)
def build_vit(cfg: ViTConfig) -> ViTBackbone:
    return ViTBackbone(cfg)
