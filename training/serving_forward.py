"""The eval-mode scoring forward as one traced graph, shared by every version of one shape.

Serving scores small batches of short histories: a small model's forward there is dozens of
Python-level module and tensor calls, which cost more than their arithmetic. Tracing it
(TorchScript) runs the same arithmetic from the graph executor. The graph takes the weights as
inputs, so it is traced once per model shape in a process and every version of that shape (a new
one every few seconds, with any catalog size) reuses it: a version costs a list of its tensors,
not a trace.

The arithmetic is ``Recommender.score``'s (``model._last_hidden``: GPT-2 blocks with the last
block's query, output projection and MLP for the newest position only), written over plain
tensors; ``tests/training/test_model_lifecycle.py`` holds the two to the same scores.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
import torch.nn.functional as F

Scorer = Callable[[torch.Tensor], torch.Tensor]
_PER_BLOCK = 12  # tensors of one block, in ``_block_tensors``' order
Shape = tuple[int, int, int, int, float, float, str]
_traced: dict[Shape, Any] = {}
_lock = threading.Lock()  # versions load in worker threads


def serving_scorer(backbone: Any, table: torch.Tensor, max_len: int) -> Scorer:
    """[B, max_len] item rows -> [B, V] scores of ``backbone`` (a ``GPT2Model`` in eval mode)
    against ``table`` [V, D], padding column -inf."""
    cfg = backbone.config
    blocks = list(backbone.h)
    attn = blocks[0].attn
    key = (len(blocks), cfg.n_head, cfg.n_embd, max_len, float(attn.scaling),
           cfg.layer_norm_epsilon, str(table.device))  # fmt: skip
    weights = [
        t.detach()
        for t in (
            table, backbone.wpe.weight[:max_len], backbone.ln_f.weight, backbone.ln_f.bias,
            *chain.from_iterable(_block_tensors(b) for b in blocks),
        )
    ]  # fmt: skip
    graph = _graph(key, weights)

    def score(inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = graph(inputs, *weights)
        return out

    return score


def _graph(key: Shape, weights: list[torch.Tensor]) -> Any:
    with _lock:
        if key not in _traced:
            layers, heads, _, max_len, scale, eps, device = key

            def forward(inputs: torch.Tensor, *w: torch.Tensor) -> torch.Tensor:
                return _scores(inputs, list(w), layers, heads, scale, eps)

            example = torch.zeros(1, max_len, dtype=torch.long, device=device)
            example[0, -1] = 1
            with torch.inference_mode(), warnings.catch_warnings():
                # Shapes read while tracing are traced as tensor ops: the batch size and the
                # catalog size may differ from the example's.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # TorchScript is in maintenance, not removed; torch.compile would cost seconds
                # per process on a CPU replica and adds nothing at these sizes.
                warnings.simplefilter("ignore", FutureWarning)
                _traced[key] = torch.jit.trace(forward, (example, *weights), check_trace=False)
        return _traced[key]


def _block_tensors(block: Any) -> list[torch.Tensor]:
    a, m = block.attn, block.mlp
    return [
        block.ln_1.weight, block.ln_1.bias, a.c_attn.weight, a.c_attn.bias,
        a.c_proj.weight, a.c_proj.bias, block.ln_2.weight, block.ln_2.bias,
        m.c_fc.weight, m.c_fc.bias, m.c_proj.weight, m.c_proj.bias,
    ]  # fmt: skip


def _scores(
    inputs: torch.Tensor, w: list[torch.Tensor], layers: int, heads: int, scale: float, eps: float
) -> torch.Tensor:
    table, wpe, lnf_w, lnf_b = w[:4]
    n = inputs.shape[1]
    pos = torch.arange(n, device=inputs.device)
    h = F.embedding(inputs, table) + wpe
    keys = inputs != 0
    causal = pos[None, :] <= pos[:, None]  # query i sees key j <= i
    itself = torch.eye(n, dtype=torch.bool, device=inputs.device)  # a padded query sees itself
    see = ((causal[None] & keys[:, None, :]) | itself[None])[:, None]  # [B, 1, L, L]
    for i in range(layers):
        last = i == layers - 1
        bw = w[4 + i * _PER_BLOCK : 4 + (i + 1) * _PER_BLOCK]
        h = _block(h, bw, see[:, :, -1:] if last else see, heads, scale, eps, last)
    s = F.layer_norm(h[:, 0], (h.shape[-1],), lnf_w, lnf_b, eps) @ table.T
    s[:, 0] = float("-inf")
    return s


def _block(
    h: torch.Tensor, w: list[torch.Tensor], see: torch.Tensor, heads: int, scale: float,
    eps: float, last: bool,
) -> torch.Tensor:  # fmt: skip
    """``GPT2Block.forward`` in eval mode (``training.model._block``'s arithmetic)."""
    ln1_w, ln1_b, qkv_w, qkv_b, o_w, o_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b = w
    d = h.shape[-1]
    q, k, v = (F.layer_norm(h, (d,), ln1_w, ln1_b, eps) @ qkv_w + qkv_b).split(d, dim=2)
    if last:
        q, h = q[:, -1:], h[:, -1:]

    def split(x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, D/H]
        return x.view(x.shape[0], x.shape[1], heads, d // heads).transpose(1, 2)

    att = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=see, scale=scale)
    h = h + att.transpose(1, 2).reshape(h.shape) @ o_w + o_b
    m = F.gelu(F.layer_norm(h, (d,), ln2_w, ln2_b, eps) @ fc_w + fc_b, approximate="tanh")
    return h + m @ out_w + out_b
