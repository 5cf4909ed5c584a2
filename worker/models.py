"""Built-in models and user model factories; `build_model` checks that a model can be flattened.

Every factory, built-in or user, is called as `factory(info=dataset.info, **kwargs)` under the
job's `torch.manual_seed`, so every rank builds the same initial weights (docs/models.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardps.proto import spec as spec_lib
from shardps.worker import plugins
from shardps.worker.dlrm import dlrm


def _outputs(info: dict[str, Any]) -> int:
    """Output width: one logit per class for classification, else num_outputs (regression)."""
    return int(info.get("num_classes") or info.get("num_outputs") or 1)


def _need(info: dict[str, Any], key: str, model: str) -> Any:
    if key not in info:
        raise ValueError(f"model {model!r} needs a dataset with info[{key!r}]; "
                         f"this dataset has {sorted(info)}")
    return info[key]


def mlp(info: dict[str, Any], hidden: Sequence[int] = (128, 64)) -> nn.Module:
    """A ReLU multi-layer perceptron on flattened inputs (classification or regression)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(_need(info, "num_features", "mlp"))
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, _outputs(info)))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """Two 3x3 conv + ReLU + 2x2 max-pool stages, then a ReLU hidden layer, for (C, H, W) inputs."""

    def __init__(self, input_shape: Sequence[int], outputs: int,
                 channels: Sequence[int] = (16, 32), hidden: int = 64):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs info['input_shape'] = (C, H, W), got {input_shape!r}")
        self.input_shape = tuple(int(d) for d in input_shape)
        c, h, w = self.input_shape
        convs: list[nn.Module] = []
        for out_c in channels:
            # ceil_mode keeps odd or tiny images from pooling down to nothing.
            convs += [nn.Conv2d(c, int(out_c), 3, padding=1), nn.ReLU(),
                      nn.MaxPool2d(2, ceil_mode=True)]
            c, h, w = int(out_c), math.ceil(h / 2), math.ceil(w / 2)
        self.features = nn.Sequential(*convs)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(),
                                  nn.Linear(hidden, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, *self.input_shape)))


def cnn(info: dict[str, Any], channels: Sequence[int] = (16, 32), hidden: int = 64) -> nn.Module:
    """A small conv net for image-shaped inputs (digits: 1x8x8)."""
    return ConvNet(_need(info, "input_shape", "cnn"), _outputs(info), channels, hidden)


class GRULanguageModel(nn.Module):
    """Character-level recurrent LM: embedding -> GRU -> linear logits per position."""

    def __init__(self, vocab_size: int, embed: int = 64, hidden: int = 128, layers: int = 1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.gru = nn.GRU(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(tokens))
        return self.head(out)


def gru(info: dict[str, Any], embed: int = 64, hidden: int = 128, layers: int = 1) -> nn.Module:
    return GRULanguageModel(int(_need(info, "vocab_size", "gru")), embed, hidden, layers)


class _CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for t in self.qkv(x).split(d, dim=2))
        # is_causal builds the mask inside the kernel: no mask buffer to keep out of the layout.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = _CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerLanguageModel(nn.Module):
    """A small decoder-only causal LM (GPT-style) with learned position embeddings.

    The output head is not tied to the token embedding: tied weights would be one parameter
    under two state_dict names, which a flat layout cannot express.
    """

    def __init__(self, vocab_size: int, seq_len: int, d_model: int = 64, n_layers: int = 2,
                 n_heads: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"transformer: d_model {d_model} is not divisible by n_heads {n_heads}")
        self.seq_len = seq_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        for module in self.modules():  # GPT-2's init: small normal weights, zero biases
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        if n > self.seq_len:
            raise ValueError(f"sequence of {n} tokens is longer than seq_len {self.seq_len}")
        x = self.tok(tokens) + self.pos(torch.arange(n, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def transformer(info: dict[str, Any], d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                seq_len: int | None = None) -> nn.Module:
    """seq_len defaults to the dataset's; a larger one only adds unused position embeddings."""
    data_len = int(_need(info, "seq_len", "transformer"))
    if seq_len is not None and seq_len < data_len:
        raise ValueError(f"transformer: seq_len {seq_len} is shorter than the data's {data_len}")
    return TransformerLanguageModel(int(_need(info, "vocab_size", "transformer")),
                                    seq_len or data_len, d_model, n_layers, n_heads)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "gru": gru,
    "transformer": transformer,
    "dlrm": dlrm,  # worker/dlrm.py: click models on a ctr file dataset
}
assert tuple(MODELS) == spec_lib.BUILTIN_MODELS


def build_model(name: str, kwargs: dict[str, Any] | None, info: dict[str, Any]) -> nn.Module:
    """Builds a built-in model by name or a user's by `package.module:factory` import path.

    The caller seeds torch first. The model must keep all its state in parameters: its
    state_dict keys must equal its named_parameters() names (buffers only with
    persistent=False, no tied weights), because only parameters travel to the servers.
    Raises ValueError naming the problem otherwise.
    """
    factory = MODELS[name] if name in MODELS else plugins.import_factory(name)
    try:
        model = factory(info=info, **(kwargs or {}))
    except TypeError as exc:  # an unknown kwarg: say which model rejected it
        raise ValueError(f"model {name!r}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {name!r} returned {type(model).__name__}, not nn.Module")
    params = [n for n, _ in model.named_parameters()]
    state = list(model.state_dict())
    if not params:
        raise ValueError(f"model {name!r} has no parameters")
    if state != params:
        extra = sorted(set(state) - set(params))
        raise ValueError(f"model {name!r}: state_dict has entries that are not parameters "
                         f"({', '.join(extra[:5]) or 'tied or reordered parameters'}); only "
                         "parameters are trained and shipped, so register buffers with "
                         "persistent=False and do not tie weights")
    return model
