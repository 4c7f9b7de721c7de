"""torchmil 1.0.2's SmTransformerABMIL, unbatched: SmTransformerEncoder -> SmAttentionPool -> linear.

Paper: "Sm: enhanced localization in Multiple Instance Learning for medical imaging
classification", NeurIPS 2024, https://arxiv.org/abs/2410.03276.

Per layer l (torchmil.nn.transformers.{layer,sm_transformer}), X: (N, in_l):

    A = Sm(MultiheadSelfAttention(LayerNorm1(X)))         (N, att_dim)  heads concatenated, then Sm
    Y = att_proj(X) + A                                    att_proj: Linear when in_l != att_dim
    Y = Y + MLP(LayerNorm2(Y))      if use_mlp             Linear(att, 4 att) -> GELU -> Linear(4 att, att)
    Y = out_proj(Y)                                        Linear when out_l != att_dim
    Y = Y + X_encoder_input         if add_self

then a final LayerNorm over in_dim, the SmAttentionPool (smcli.model) and the head `last_layer`.
The attention is softmax(Q K^T / sqrt(head_dim)) V per head, Q, K, V from one bias-free Linear
(qkv_nn). The encoder's Sm is always built (no `sm_where`, no Identity for alpha 0).

Self-attention is O(N^2) in time but never in memory: the backend hook
`scaled_dot_product_attention` takes blocks of query rows against all keys on the CPU (peak
O(block x N)) and is torch's fused kernel on CUDA. The math is written once against the backend's
array namespace, as smcli.model is; the CPU path never imports torch.

torchmil quirk: MultiheadSelfAttention passes its dropout rate to scaled_dot_product_attention
even in eval mode, so a model built with transf_dropout > 0 is stochastic in torchmil's own eval
forward. smcli scores without dropout, the deterministic path (export and convert say so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from smcli.backends import Backend
from smcli.model import (
    Alpha,
    Attention,
    Sm,
    SmABMIL,
    SmAttentionPool,
    SmGraph,
    _bias_init,
    _linear_init,
    activate,
    as_graph,
    to_numpy,
)
from smcli.numeric import FLOAT32_MAX

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which torchmil uses
CHUNK_ROWS = 8192  # row-wise steps (LayerNorm, MLP) run on this many rows at a time
PREFIX = "transformer_encoder"


@dataclass(frozen=True)
class TransformerConfig:
    """SmTransformerEncoder constructor arguments as SmTransformerABMIL passes them (transf_*)."""

    in_dim: int
    att_dim: int = 512
    n_layers: int = 1
    n_heads: int = 4
    use_mlp: bool = True
    add_self: bool = True
    dropout: float = 0.0  # recorded; smcli never applies it (see the module docstring)
    sm_alpha: Alpha = "trainable"
    sm_mode: str = "approx"
    sm_steps: int = 10

    def layer_dims(self) -> list[tuple[int, int]]:
        """(in_l, out_l) of each layer: in_dim into the first, in_dim out of the last, att_dim between."""
        return [
            (
                self.in_dim if index == 0 else self.att_dim,
                self.in_dim if index == self.n_layers - 1 else self.att_dim,
            )
            for index in range(self.n_layers)
        ]


def check_transformer_config(config: TransformerConfig) -> None:
    """Raise ValueError for settings torchmil would reject or cannot run."""
    for name in ("in_dim", "att_dim", "n_layers", "n_heads"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"transformer {name} must be a positive integer, got {value!r}")
    if config.att_dim % config.n_heads:
        raise ValueError(f"transformer att_dim {config.att_dim} is not divisible by n_heads {config.n_heads}")
    if config.add_self and config.n_layers > 1 and config.att_dim != config.in_dim:
        raise ValueError(
            f"transformer add_self with {config.n_layers} layers needs att_dim == in_dim "
            f"({config.att_dim} != {config.in_dim}): torchmil's forward cannot run it"
        )
    if config.sm_mode not in ("approx", "exact"):
        raise ValueError(f"transformer sm_mode must be approx or exact, got {config.sm_mode!r}")
    alpha = config.sm_alpha
    if alpha != "trainable" and not (isinstance(alpha, float) and 0.0 <= alpha < 1.0):
        raise ValueError(f"transformer sm_alpha must be 'trainable' or a number in [0, 1), got {alpha!r}")
    steps = config.sm_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"transformer sm_steps must be a non-negative integer, got {steps!r}")
    if not (isinstance(config.dropout, float) and 0.0 <= config.dropout < 1.0):
        raise ValueError(f"transformer dropout must be a number in [0, 1), got {config.dropout!r}")


def dropout_note(config: TransformerConfig) -> str | None:
    """One line saying smcli scores without the attention dropout torchmil applies even in eval."""
    if config.dropout == 0:
        return None
    return (
        f"the transformer's dropout {config.dropout:g} is not applied: torchmil passes it to "
        "scaled_dot_product_attention even in eval mode (its own eval scores are random); smcli "
        "scores the deterministic model without dropout"
    )


def layer_norm(x: Any, weight: Any, bias: Any, xp: Any) -> Any:
    """torch.nn.LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * weight + bias, x: (R, D)."""
    mean = xp.mean(x, axis=1, keepdims=True)
    centered = x - mean
    variance = xp.mean(centered * centered, axis=1, keepdims=True)  # biased, as torch
    centered *= 1.0 / xp.sqrt(variance + LAYER_NORM_EPS)
    centered *= weight
    centered += bias
    return centered


class SmTransformerABMIL:
    """torchmil's SmTransformerABMIL without a feature extractor. X: (N, in_dim), adj: (N, N) sparse.

    Parameters under torchmil's state-dict names (`transformer_encoder.*`, `pool.*`,
    `last_layer.*`), drawn from `seed` until a state dict is loaded.
    """

    def __init__(self, transformer: TransformerConfig, pool: SmAttentionPool, seed: int = 2) -> None:
        check_transformer_config(transformer)
        self.config = transformer
        self.abmil = SmABMIL(pool, transformer.in_dim, seed=seed + 1)  # the pool and last_layer
        self.params: dict[str, np.ndarray] = {}
        self._on_device: dict[str, Any] | None = None
        rng = np.random.default_rng(seed)
        att = transformer.att_dim
        for index, (in_l, out_l) in enumerate(transformer.layer_dims()):
            name = f"{PREFIX}.layers.{index}"
            self.params[f"{name}.att_module.qkv_nn.weight"] = _linear_init(rng, 3 * att, in_l)
            if transformer.sm_alpha == "trainable":
                self.params[f"{name}.att_module.sm.sm.coef"] = np.array(1.0, dtype=np.float32)
            linears = [("att_proj", att, in_l)] if in_l != att else []
            if transformer.use_mlp:
                linears += [("mlp_module.0", 4 * att, att), ("mlp_module.3", att, 4 * att)]
            if out_l != att:
                linears.append(("out_proj", out_l, att))
            for layer, out_dim, in_dim in linears:
                self.params[f"{name}.{layer}.weight"] = _linear_init(rng, out_dim, in_dim)
                self.params[f"{name}.{layer}.bias"] = _bias_init(rng, out_dim, in_dim)
            for norm, dim in (("norm1", in_l), ("norm2", att)):  # norm2 exists even without the MLP
                self.params[f"{name}.{norm}.weight"] = np.ones(dim, dtype=np.float32)
                self.params[f"{name}.{norm}.bias"] = np.zeros(dim, dtype=np.float32)
        self.params[f"{PREFIX}.norm.weight"] = np.ones(transformer.in_dim, dtype=np.float32)
        self.params[f"{PREFIX}.norm.bias"] = np.zeros(transformer.in_dim, dtype=np.float32)

    # ---------------------------------------------------------------- parameters

    @property
    def pool(self) -> SmAttentionPool:
        return self.abmil.pool

    @property
    def head(self) -> dict[str, np.ndarray]:
        return self.abmil.head

    @property
    def backend(self) -> Backend:
        return self.pool.backend

    @property
    def device(self) -> str:
        return self.pool.device

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {name: value.copy() for name, value in self.params.items()}
        state.update(self.abmil.state_dict())
        return state

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(value.shape) for name, value in self.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, Any], strict: bool = True) -> None:
        expected = set(self.state_dict())
        if strict and set(tensors) != expected:
            missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        loaded = {}
        for name in set(self.params) & set(tensors):
            value = to_numpy(tensors[name])
            if tuple(value.shape) != self.params[name].shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {self.params[name].shape}")
            loaded[name] = np.array(value, dtype=np.float32)
        self.abmil.load_state_dict(
            {k: v for k, v in tensors.items() if not k.startswith(PREFIX + ".")}, strict
        )
        self.params.update(loaded)
        self._on_device = None

    def to(self, device: str) -> SmTransformerABMIL:
        if device != self.device:
            self.abmil.to(device)
            self._on_device = None
        return self

    def eval(self) -> SmTransformerABMIL:
        return self

    def layer_sm(self, index: int) -> Sm:
        """Layer `index`'s Sm on the concatenated heads; torchmil builds it whatever alpha is."""
        alpha = self.config.sm_alpha
        if alpha == "trainable":
            coef = float(self.params[f"{PREFIX}.layers.{index}.att_module.sm.sm.coef"])
        else:
            coef = 1.0 / (1.0 - float(alpha)) - 1
        return Sm(coef, self.config.sm_steps, self.config.sm_mode)

    def _weights(self) -> dict[str, Any]:
        if self._on_device is None:
            asarray = self.backend.asarray
            self._on_device = {
                name: asarray(np.ascontiguousarray(value))
                for name, value in self.params.items()
                if not name.endswith(".coef")
            }
        return self._on_device

    def feature_limit(self) -> float:
        """The largest |feature| scored without overflowing float32 before the first LayerNorm.

        The raw features meet att_proj (a Linear, when in_dim != att_dim), the residual and add_self
        sums (a few copies of x) and LayerNorm's squares; a quarter of float32's range is kept.
        """
        budget = FLOAT32_MAX / 4
        limits = [math.sqrt(budget) / 4]  # LayerNorm squares x - mean
        weight = self.params.get(f"{PREFIX}.layers.0.att_proj.weight")
        if weight is not None:
            row_l1 = float(np.abs(weight.astype(np.float64)).sum(axis=1).max(initial=0.0))
            offset = float(np.abs(self.params[f"{PREFIX}.layers.0.att_proj.bias"]).max(initial=0.0))
            if row_l1 > 0:
                limits.append(max(budget - offset, 0.0) / row_l1)
        return min(limits)

    # ---------------------------------------------------------------- forward

    def encode(self, X: Any, graph: SmGraph) -> Any:
        """SmTransformerEncoder's forward: X (N, in_dim) -> (N, in_dim) float32 on the backend."""
        backend, xp = self.backend, self.backend.xp
        weights = self._weights()
        features = xp.astype(backend.asarray(X), xp.float32)  # (N, in_dim)
        hidden = features
        for index, (in_l, out_l) in enumerate(self.config.layer_dims()):
            hidden = self._layer(index, hidden, features, graph, weights, in_l, out_l)
        name = f"{PREFIX}.norm"
        return self._rowwise(
            hidden, lambda rows: layer_norm(rows, weights[f"{name}.weight"], weights[f"{name}.bias"], xp)
        )

    def _rowwise(self, x: Any, step, out_dim: int | None = None) -> Any:
        """Apply a row-wise step to x (N, D) CHUNK_ROWS rows at a time into a new (N, out_dim) array."""
        backend, xp = self.backend, self.backend.xp
        n = x.shape[0]
        out = backend.empty((n, x.shape[1] if out_dim is None else out_dim), xp.float32)
        for start in range(0, n, CHUNK_ROWS):
            out[start : start + CHUNK_ROWS] = step(x[start : start + CHUNK_ROWS])
        return out

    def _linear(self, rows: Any, weights: dict[str, Any], name: str) -> Any:
        xp = self.backend.xp
        return xp.matmul(rows, weights[f"{name}.weight"].T) + weights[f"{name}.bias"]

    def _layer(
        self,
        index: int,
        x: Any,
        encoder_input: Any,
        graph: SmGraph,
        weights: dict[str, Any],
        in_l: int,
        out_l: int,
    ) -> Any:
        """One SmTransformerLayer (plus add_self): x (N, in_l) -> (N, out_l)."""
        backend, xp = self.backend, self.backend.xp
        config = self.config
        att, n_heads = config.att_dim, config.n_heads
        head_dim = att // n_heads
        name = f"{PREFIX}.layers.{index}"
        qkv_weight = weights[f"{name}.att_module.qkv_nn.weight"]  # (3 att, in_l)

        def project(rows: Any) -> Any:
            normed = layer_norm(rows, weights[f"{name}.norm1.weight"], weights[f"{name}.norm1.bias"], xp)
            return xp.matmul(normed, qkv_weight.T)  # (rows, 3 att): q | k | v

        qkv = self._rowwise(x, project, 3 * att)  # (N, 3 att)
        n = x.shape[0]
        # (N, att) -> (n_heads, N, head_dim): column h * head_dim + d is head h's feature d, as
        # torchmil's view(batch, seq, n_heads, head_dim)
        query, key, value = (
            xp.permute_dims(
                xp.reshape(qkv[:, part * att : (part + 1) * att], (n, n_heads, head_dim)), (1, 0, 2)
            )
            for part in range(3)
        )
        attended = backend.scaled_dot_product_attention(query, key, value)  # (n_heads, N, head_dim)
        del qkv, query, key, value
        attended = xp.reshape(xp.permute_dims(attended, (1, 0, 2)), (n, att))  # heads concatenated
        attended = self.layer_sm(index)(backend.asarray(_contiguous(attended, xp)), graph)  # (N, att)

        def finish(start: int, stop: int) -> Any:
            rows = x[start:stop]
            out = self._linear(rows, weights, f"{name}.att_proj") if in_l != att else rows
            out = out + attended[start:stop]  # (rows, att)
            if config.use_mlp:
                normed = layer_norm(out, weights[f"{name}.norm2.weight"], weights[f"{name}.norm2.bias"], xp)
                inner = activate(self._linear(normed, weights, f"{name}.mlp_module.0"), "gelu", backend)
                out = out + self._linear(inner, weights, f"{name}.mlp_module.3")
            if out_l != att:
                out = self._linear(out, weights, f"{name}.out_proj")
            if config.add_self:
                out = out + encoder_input[start:stop]
            return out

        result = backend.empty((n, out_l), xp.float32)
        for start in range(0, n, CHUNK_ROWS):
            result[start : start + CHUNK_ROWS] = finish(start, start + CHUNK_ROWS)
        return result

    def attention(self, X: Any, adj: Any, symmetric: bool | None = None) -> Attention:
        """Attention logits f (N,) of the pool over the encoded bag, and the bag logit."""
        graph = as_graph(adj, self.backend, symmetric)
        encoded = self.encode(X, graph)  # (N, in_dim)
        return self.pool.attention(encoded, graph, head=self.head, symmetric=symmetric)

    def forward_reference(self, X: Any, adj: Any) -> tuple[float, Any]:
        """Bag logit and attention logits (N,), as torchmil's forward(return_att=True)."""
        graph = as_graph(adj, self.backend)
        return self.abmil.forward_reference(self.encode(X, graph), graph)


def _contiguous(array: Any, xp: Any) -> Any:
    """A C-contiguous copy when needed (the sparse kernels want one)."""
    if isinstance(array, np.ndarray):
        return np.ascontiguousarray(array)
    return array.contiguous()
