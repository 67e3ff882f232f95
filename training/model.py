"""The recommender: a causal transformer over item-id sequences (SASRec-style).

GPT-2 blocks from transformers, built from ``ModelConfig`` (no hub download ever). Item ids are the
tokens; the output layer is tied to the item embedding table, so scoring the next item is one
matmul against it and the same table serves diversity re-ranking.

The model owns its lifecycle (nanoGPT's ``model.py`` is the example): every rebuild from saved
weights, in the registry, the Ray Train workers, the round driver and the benchmarks, goes through
``from_state`` / ``from_file`` (strict: a missing, extra or misshapen tensor is an error), and every
distillation teacher is ``frozen_teacher()``.

Public API:
  Recommender(cfg, n_rows, text=None)        build (n_rows = len(ItemVocab), row 0 = padding;
                                             text [n_rows, 384] title features in text modes)
  Recommender.from_state(cfg, state)         strict load of tensors or numpy arrays
  Recommender.from_file(path, cfg)           the same from safetensors (never unpickles)
  model.state_numpy()                        {name: np.ndarray}, e.g. for Ray's object store
  model.frozen_teacher()                     eval-mode, requires_grad=False copy for distillation
  model.loss(inputs, targets, teacher_logits, kd_weight, kd_temperature)   [B, L] item rows
  model.score(inputs)                        [B, n_rows] next-item scores (padding = -inf)
  model.serving_scorer()                     ``score`` traced for serving (eval, [B, max_len])
  model.item_embeddings()                    [n_rows, D] the tied table (fused in text modes)
  model.grow(n_rows, init=None, text=None)   append rows for new items, old rows untouched
  save_weights(model, path) / load_weights(path, cfg, n_rows)   safetensors, no pickle

Distillation with a growing catalog: the teacher (the champion) has fewer rows than the student
when a round adds items. ``Teacher`` reads rows it never knew as padding, so the grown student's
inputs cannot crash it, and ``loss`` distils only over the teacher's own rows, at positions whose
current item the teacher knows.

Item rows (``ModelConfig.item_repr``, ``training.items``): ``id`` is the ID table
``backbone.wte`` alone (the state-dict keys of every version before text modes); ``text`` is a
learned projection of the rows' title features (``items.text``, a buffer saved with the weights;
the ID table stays, frozen and unused, so the row count lives where it always did); ``id+text``
is their sum. One fused table feeds the transformer (``inputs_embeds``; GPT-2 adds positions)
and scores its output, so loss, sampled softmax, distillation, scoring and serving share it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2Config, GPT2Model

from training.config import ModelConfig
from training.errors import ModelStateError
from training.items import TEXT_DIM, TextItems, text_for
from training.sampled import sampled_softmax
from training.serving_forward import serving_scorer

TABLE = "backbone.wte.weight"  # the item table: its row count is the catalog size


class Recommender(nn.Module):
    def __init__(self, cfg: ModelConfig, n_rows: int, text: torch.Tensor | None = None) -> None:
        super().__init__()
        if n_rows < 2:
            raise ValueError("the catalog needs at least one item (n_rows counts padding too)")
        self.cfg = cfg
        gpt = GPT2Config(
            vocab_size=n_rows,
            n_positions=cfg.max_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            # GPT-2's own "gelu_new" is the same tanh approximation written as five tensor ops;
            # torch's fused kernel made a forward ~22% and a training step ~30% faster (1 CPU
            # thread, width 32), with the same weights and the same function.
            activation_function="gelu_pytorch_tanh",
        )
        self.backbone = GPT2Model(gpt)
        rows = text_for(cfg.item_repr, text, n_rows, "Recommender")
        self.items = TextItems(rows, cfg.d_model) if rows is not None else None
        if cfg.item_repr == "text":
            self.backbone.wte.weight.requires_grad_(False)  # no ID row contributes
        self.rows: torch.Tensor | None = None  # see ``rows_apart``

    # -- lifecycle ----------------------------------------------------------------------
    @classmethod
    def from_state(cls, cfg: ModelConfig, state: Mapping[str, torch.Tensor | np.ndarray]) -> Self:
        """Rebuild from a state dict (tensors or numpy arrays); every tensor must fit exactly."""
        if TABLE not in state:
            raise ModelStateError(
                f"weights lack {TABLE!r} (the item table): not a streamtune Recommender state"
            )
        tensors = {
            k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in state.items()
        }
        n_rows = int(tensors[TABLE].shape[0])
        # Placeholder features: the strict load below replaces them, or fails if the state has
        # none (or misshapen ones).
        text = torch.zeros(n_rows, TEXT_DIM) if cfg.item_repr != "id" else None
        model = cls(cfg, n_rows, text)
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            raise ModelStateError(
                f"weights do not fit ModelConfig {cfg.model_dump()}: {err}"
            ) from None
        return model

    @classmethod
    def from_file(cls, path: Path, cfg: ModelConfig) -> Self:
        """Rebuild from a safetensors file (never unpickles)."""
        return cls.from_state(cfg, load_file(str(path)))

    def state_numpy(self) -> dict[str, np.ndarray]:
        """Float32 CPU copies of every tensor, keyed like ``state_dict``."""
        return {k: v.detach().float().cpu().numpy() for k, v in self.state_dict().items()}

    def frozen_teacher(self) -> Teacher:
        """A frozen copy for distillation: eval mode for good, no gradients, unknown rows read as
        padding. Changing this model afterwards does not change the teacher."""
        teacher = Teacher.from_state(self.cfg, self.state_dict())
        teacher.requires_grad_(False)
        teacher.eval()
        return teacher

    # -- forward ------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return int(self.backbone.wte.weight.shape[0])

    def samples_loss(self) -> bool:
        """Whether ``loss`` is the sampled softmax: asked for, or 'auto' on a large catalog (and
        only while there are more rows than negatives to draw)."""
        cfg, rows = self.cfg, self.n_rows
        wanted = cfg.loss == "sampled" or (cfg.loss == "auto" and rows > cfg.sampled_above)
        return wanted and cfg.num_negatives < rows - 1

    def rows_apart(self) -> torch.Tensor:
        """Hand the ID table to a row-wise optimizer (``training.rows``): it stops being a
        parameter for the dense one (``requires_grad`` off), and the training loss reads it
        through the returned tensor (the same storage) with sparse gradients, which hold only the
        rows a step touched. Only for the sampled loss over ID rows: a full softmax or a fused
        text table touches every row anyway."""
        if not self.samples_loss() or self.cfg.item_repr != "id":
            raise ValueError("only a sampled loss over ID rows trains the item table row-wise")
        table = self.backbone.wte.weight
        table.requires_grad_(False)
        self.rows = table.detach().requires_grad_()
        return self.rows

    def item_embeddings(self) -> torch.Tensor:
        """[V, D]: the item table the inputs are read from and the outputs scored against."""
        ids = self.backbone.wte.weight
        if self.items is None:
            return ids
        text = self.items()
        return text if self.cfg.item_repr == "text" else ids + text

    def hidden(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [B, L] left-padded item rows -> [B, L, D] states."""
        return self._hidden(inputs, self.item_embeddings())

    def _hidden(
        self, inputs: torch.Tensor, table: torch.Tensor, sparse: bool = False
    ) -> torch.Tensor:
        mask = (inputs != 0).long()
        rows = F.embedding(inputs, table, sparse=sparse)
        out = self.backbone(inputs_embeds=rows, attention_mask=mask)
        return out.last_hidden_state

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, L, V]: every position's next-item scores."""
        table = self.item_embeddings()
        return self._hidden(inputs, table) @ table.T

    def score(self, inputs: torch.Tensor) -> torch.Tensor:
        """[B, L] histories (left-padded, newest last) -> [B, V] next-item scores."""
        table = self.item_embeddings()
        h = self._last_hidden(inputs, table)  # [B, D]
        s = h @ table.T  # [B, V]
        s[:, 0] = float("-inf")
        return s

    def serving_scorer(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``score`` for serving, traced (``training.serving_forward``): the same scores from a
        graph shared by every version of this shape, with the item table computed once (it
        changes only with the weights). Puts the model in eval mode; inputs must be
        [B, max_len], as the serving path pads them."""
        self.eval()
        with torch.inference_mode():
            table = self.item_embeddings().clone()
        return serving_scorer(self.backbone, table, self.cfg.max_len)

    def _last_hidden(self, inputs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, D]: the newest position's state, what scoring needs.

        The same function as ``_hidden(...)[:, -1]`` in eval mode, computed for that position
        only in the last block: its attention reads every position's keys and values, but its
        query, output projection and MLP (most of a block's work) run once instead of L times.
        A one-block model scores ~4x faster this way (the gate, serving). Training mode (dropout)
        takes the full forward.
        """
        if self.training:
            return self._hidden(inputs, table)[:, -1]
        bb = self.backbone
        n = inputs.shape[1]
        keys = inputs != 0  # [B, L] which positions hold an item
        pos = torch.arange(n, device=inputs.device)
        h = bb.drop(F.embedding(inputs, table) + bb.wpe(pos))  # GPT-2's absolute positions
        # Causal and not padding; a padded query sees itself (never read by an item's query),
        # so no row of the softmax is empty.
        causal = pos[None, :] <= pos[:, None]  # [L, L] query i sees key j <= i
        itself = torch.eye(n, dtype=torch.bool, device=inputs.device)
        see = (causal[None] & keys[:, None, :]) | itself[None]
        blocks = list(bb.h)
        for block in blocks[:-1]:
            h = _block(block, h, see[:, None])
        h = _block(blocks[-1], h, see[:, None, -1:], last=True)  # [B, 1, D]
        return bb.ln_f(h)[:, 0]

    def loss(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        kd_weight: float = 0.0,
        kd_temperature: float = 2.0,
    ) -> torch.Tensor:
        """Next-item cross-entropy on positions whose target is an item (target 0 = ignore).

        ``teacher_logits`` [B, L, V_old] adds a distillation term over the teacher's catalog only
        (rows 1..V_old-1: rows added since the teacher are left out), at the positions whose
        current item the teacher knew (elsewhere it predicted from a history it could not read).
        """
        sparse = self.rows is not None and self.training
        table = self.rows if sparse and self.rows is not None else self.item_embeddings()
        h = self._hidden(inputs, table, sparse)  # [B, L, D]
        valid = targets != 0
        hv, tv = h[valid], targets[valid]  # [N, D], [N]
        if self.samples_loss():
            ce = sampled_softmax(hv, tv, table, self.cfg.num_negatives, sparse)
        else:
            logits = hv @ table.T  # [N, V]
            logits[:, 0] = float("-inf")
            ce = F.cross_entropy(logits, tv)
        if teacher_logits is None or kd_weight == 0.0:
            return ce
        if sparse:
            raise ModelStateError("distillation reads the whole item table: train it dense")
        v_old = teacher_logits.shape[-1]
        if v_old > table.shape[0]:
            raise ModelStateError(
                f"teacher has {v_old} rows, the student {table.shape[0]}: the item table only grows"
            )
        kd_at = valid & (inputs < v_old)  # [B, L]
        if not bool(kd_at.any()):
            return ce
        t = kd_temperature
        student = (h[kd_at] @ table[:v_old].T)[:, 1:] / t  # [N', V_old - 1], padding excluded
        teacher = teacher_logits[kd_at][:, 1:] / t
        kd = F.kl_div(
            F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
            reduction="batchmean",
        ) * (t * t)  # fmt: skip
        return ce + kd_weight * kd

    @torch.no_grad()
    def grow(
        self, n_rows: int, init: torch.Tensor | None = None, text: torch.Tensor | None = None
    ) -> None:
        """Append rows up to ``n_rows``; ``init`` [n_rows - old, D] sets the new ID rows, and in
        text modes ``text`` [n_rows - old, 384] are the new rows' title features (required).

        New ID rows start, without ``init``: in ``id``, near the mean of the known rows; in
        ``id+text`` at zero, so a new item starts exactly where its title puts it (its ID row
        then learns what the title misses); in ``text`` at zero (unused).
        """
        old = self.n_rows
        if n_rows < old:
            raise ValueError(f"cannot shrink the item table from {old} to {n_rows} rows")
        if n_rows == old:
            return
        rows = text_for(self.cfg.item_repr, text, n_rows - old, "grow")
        if self.items is not None and rows is not None:
            self.items.grow(rows)
        ids = self.backbone.wte.weight
        new = torch.zeros(n_rows - old, ids.shape[1], dtype=ids.dtype)
        if init is not None:
            new.copy_(init)
        elif self.items is None:
            # Near the mean of known items: a neutral, in-distribution start for cold items.
            new.normal_(0.0, float(ids[1:].std())).add_(ids[1:].mean(0))
        self.backbone.resize_token_embeddings(n_rows, mean_resizing=False)
        self.backbone.wte.weight[old:] = new
        self.backbone.wte.weight.requires_grad_(self.cfg.item_repr != "text")
        self.backbone.config.vocab_size = n_rows
        self.rows = None  # a new table: dense again until handed over anew


def _block(block: Any, h: torch.Tensor, see: torch.Tensor, last: bool = False) -> torch.Tensor:
    """One GPT-2 block in eval mode (``GPT2Block.forward``'s arithmetic, through its own
    modules) over [B, L, D] states; ``see`` [B, 1, Q, L] which keys each query attends to;
    ``last``: the newest position's query only (-> [B, 1, D]). ``block`` is a ``GPT2Block``
    (Any: its submodules are untyped attributes)."""
    attn = block.attn
    q, k, v = attn.c_attn(block.ln_1(h)).split(attn.split_size, dim=2)
    if last:
        q, h = q[:, -1:], h[:, -1:]

    def heads(x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, D/H]
        return x.view(*x.shape[:2], attn.num_heads, attn.head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        heads(q), heads(k), heads(v), attn_mask=see, scale=attn.scaling
    )  # [B, H, Q, D/H]
    h = h + attn.c_proj(out.transpose(1, 2).reshape(*h.shape))
    return h + block.mlp(block.ln_2(h))


def save_weights(model: Recommender, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def load_weights(path: Path, cfg: ModelConfig, n_rows: int | None = None) -> Recommender:
    """``Recommender.from_file``, grown to ``n_rows`` when given (kept for existing callers)."""
    model = Recommender.from_file(path, cfg)
    if n_rows is not None and n_rows > model.n_rows:
        model.grow(n_rows)
    return model


class Teacher(Recommender):
    """A frozen distillation teacher (build it with ``Recommender.frozen_teacher``).

    Rows past its table (items added after it was trained) are read as padding, so it takes the
    grown student's inputs; it stays in eval mode whatever ``train()`` asks.
    """

    def train(self, mode: bool = True) -> Self:
        return super().train(False)

    def _hidden(
        self, inputs: torch.Tensor, table: torch.Tensor, sparse: bool = False
    ) -> torch.Tensor:
        return super()._hidden(self._known(inputs), table, sparse)

    def _last_hidden(self, inputs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return super()._last_hidden(self._known(inputs), table)

    def _known(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.where(inputs < self.n_rows, inputs, torch.zeros_like(inputs))
