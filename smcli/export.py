"""`smcli.export_torchmil`: write an smcli checkpoint straight from a live torchmil model
(SmAttentionPool, SmABMIL or SmTransformerABMIL).

Every setting is read off the module itself, so nothing is assumed: Sm mode and steps from the Sm
submodule torchmil built (ApproxSm / ExactSm), alpha from its `coef` (a trainable Parameter, or
the float torchmil derived from alpha), sm_where and the activation function from the attributes
the forward uses, spectral norm from the parametrizations present on proj1/proj2 (their u, v
exported as stored: the eval-mode weight). torchmil is never imported: the model is duck-typed.
The optional `dataset` (the torchmil dataset the model was trained on) gives the graph settings.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from smcli.checkpoint import (
    SPECTRAL_LAYERS,
    ModelConfig,
    PoolConfig,
    build_module,
    check_pool_config,
    feature_extractor_refusal,
    save_checkpoint,
    verify_state,
)
from smcli.errors import ModelError
from smcli.graph import DEFAULT_DIST_THR, GraphOptions
from smcli.transformer import (
    LAYER_NORM_EPS,
    PREFIX,
    TransformerConfig,
    check_transformer_config,
    dropout_note,
)

# The dataset class that defines `_load_coords` decides how coords become grid cells.
DATASET_GRIDS = {
    "CAMELYON16MILDataset": "min",  # coords / patch_size - column min, truncated
    "PANDAMILDataset": "min",
    "TridentWSIDataset": "zero",  # coords / patch_size, truncated (no min)
    "ProcessedMILDataset": "as-is",  # the stored coords are the grid (patch_size 1)
}
# methods that build the graph; a class we do not know overriding one of them is refused
DATASET_GRAPH_METHODS = ("_load_coords", "_build_adj", "_build_bag")


def _fail(message: str) -> ModelError:
    return ModelError(f"export_torchmil: {message}")


def _is_parametrized(layer: Any) -> bool:
    """The layer's weight is a parametrization (torch.nn.utils.parametrize)."""
    parametrizations = getattr(layer, "parametrizations", None)
    return parametrizations is not None and "weight" in parametrizations


def _check_spectral_norm(layer: Any, name: str) -> None:
    """Only torch's spectral_norm on dim 0 (Linear's default) is what smcli rebuilds."""
    chain = list(layer.parametrizations["weight"])
    kinds = [type(item).__name__ for item in chain]
    if kinds != ["_SpectralNorm"]:
        raise _fail(f"{name}.weight is parametrized by {', '.join(kinds)}, not spectral_norm")
    if getattr(chain[0], "dim", 0) != 0:
        raise _fail(f"{name} has spectral norm on dim {chain[0].dim}, smcli rebuilds dim 0")


def _activation(pool: Any) -> str:
    """The activation the forward calls (`act_layer_fn`), by function name; else the `act` string."""
    function = getattr(pool, "act_layer_fn", None)
    name = getattr(function, "__name__", None) if function is not None else getattr(pool, "act", None)
    return str(name)


def _smoothing(pool: Any) -> tuple[str, float | str, int]:
    """(sm_mode, sm_alpha, sm_steps) of the pool's Sm, as torchmil's forward applies it."""
    outer = pool.sm
    inner = getattr(outer, "sm", None)
    if inner is None or not hasattr(inner, "coef"):  # torch.nn.Identity: no Sm at all
        steps, alpha = int(getattr(pool, "sm_steps", 10)), getattr(pool, "sm_alpha", "trainable")
        if pool.sm_where != "none" and steps > 0 and alpha not in (0.0, 0):
            raise _fail(f"pool.sm is {type(outer).__name__}, not torchmil's Sm")
        return str(getattr(pool, "sm_mode", "approx")), alpha if alpha != 0 else 0.0, steps
    kind = type(inner).__name__
    if kind == "ApproxSm":
        mode, steps = "approx", int(inner.num_steps)
    elif kind == "ExactSm":
        mode, steps = "exact", int(getattr(outer, "num_steps", getattr(pool, "sm_steps", 10)))
    else:
        raise _fail(f"pool.sm.sm is {kind}, expected torchmil's ApproxSm or ExactSm")
    coef = inner.coef
    if hasattr(coef, "detach"):  # a Parameter: trainable alpha, its value goes with the tensors
        return mode, "trainable", steps
    alpha = float(inner.alpha)
    if not math.isclose(1.0 / (1.0 - alpha) - 1, float(coef), rel_tol=0, abs_tol=0):
        raise _fail(f"pool.sm.sm.coef {coef!r} is not the one alpha {alpha!r} gives")
    return mode, alpha, steps


def pool_config(pool: Any) -> PoolConfig:
    """Every SmAttentionPool setting, read off the live module."""
    where = str(pool.sm_where)
    mode, alpha, steps = _smoothing(pool)
    spectral = (_is_parametrized(pool.proj1), _is_parametrized(pool.proj2))
    for layer, name in ((pool.proj1, "proj1"), (pool.proj2, "proj2")):
        if _is_parametrized(layer):
            _check_spectral_norm(layer, name)
    if where not in SPECTRAL_LAYERS:
        raise _fail(f"sm_where {where!r} is not one torchmil knows")
    if any(spectral) and SPECTRAL_LAYERS[where] != spectral:
        found = " and ".join(name for name, on in zip(("proj1", "proj2"), spectral, strict=True) if on)
        raise _fail(f"spectral norm on {found} is not what torchmil builds for sm_where {where}")
    in_dim, att_dim = int(pool.proj1.in_features), int(pool.proj1.out_features)
    config = PoolConfig(in_dim, att_dim, _activation(pool), mode, alpha, steps, where, any(spectral))
    try:
        check_pool_config(config)
    except ValueError as err:
        raise _fail(str(err)) from None
    return config


# What export understands, as a whitelist: every submodule of the model (its path, with the part
# names torchmil gives them) must be one of these torch/torchmil classes, and every parameter and
# buffer must be among the tensors exported. Anything else (an extra child, a subclass with its
# own forward, a transformer encoder before smcli models one) is refused: exporting the rest
# would score a different model than the one trained.
IDENTITY = "torch.nn.modules.linear.Identity"
LINEAR = "torch.nn.modules.linear.Linear"
SPECTRAL_PARTS = {
    "": {LINEAR, "torch.nn.utils.parametrize.ParametrizedLinear"},
    "parametrizations": {"torch.nn.modules.container.ModuleDict"},
    "parametrizations.weight": {"torch.nn.utils.parametrize.ParametrizationList"},
    "parametrizations.weight.0": {"torch.nn.utils.parametrizations._SpectralNorm"},
}
SM_PARTS = {"": {"torchmil.nn.sm.Sm"}, "sm": {"torchmil.nn.sm.ApproxSm", "torchmil.nn.sm.ExactSm"}}
POOL_CLASS = "torchmil.nn.attention.sm_attention_pool.SmAttentionPool"
SMABMIL_CLASS = "torchmil.models.sm_abmil.SmABMIL"
IGNORED_CHILDREN = ("criterion",)  # the training loss: not part of the forward, not exported


def _prefixed(prefix: str, parts: dict[str, set[str]]) -> dict[str, set[str]]:
    return {(f"{prefix}.{path}" if path else prefix): classes for path, classes in parts.items()}


def pool_parts(prefix: str = "") -> dict[str, set[str]]:
    """The submodules of torchmil's SmAttentionPool (under `prefix`) and the classes each may be."""
    parts = {"": {POOL_CLASS}}
    parts.update(_prefixed("sm", SM_PARTS))
    parts["sm"] = parts["sm"] | {IDENTITY}  # torchmil's stand-in when there is no Sm
    for layer in ("proj1", "proj2"):
        parts.update(_prefixed(layer, SPECTRAL_PARTS))
    return parts if not prefix else _prefixed(prefix, parts)


def smabmil_parts() -> dict[str, set[str]]:
    parts = {"": {SMABMIL_CLASS}, "feat_ext": {IDENTITY}, "last_layer": {LINEAR}}
    parts.update(pool_parts("pool"))
    return parts


TRANSFORMER_CLASS = "torchmil.models.sm_transformer_abmil.SmTransformerABMIL"
SM_TRANSFORMER = "torchmil.nn.transformers.sm_transformer"
LAYER_NORM = "torch.nn.modules.normalization.LayerNorm"


def transformer_parts(n_layers: int) -> dict[str, set[str]]:
    """SmTransformerABMIL's submodules: the SmABMIL parts plus torchmil's SmTransformerEncoder."""
    parts = smabmil_parts()
    parts[""] = {TRANSFORMER_CLASS}
    parts.update(
        {
            PREFIX: {f"{SM_TRANSFORMER}.SmTransformerEncoder"},
            f"{PREFIX}.layers": {"torch.nn.modules.container.ModuleList"},
            f"{PREFIX}.norm": {LAYER_NORM},
        }
    )
    for index in range(n_layers):
        layer = {
            "": {f"{SM_TRANSFORMER}.SmTransformerLayer"},
            "att_module": {f"{SM_TRANSFORMER}.SmMultiheadSelfAttention"},
            "att_module.qkv_nn": {LINEAR},
            "att_module.out_proj": {IDENTITY},
            "in_proj": {IDENTITY},
            "att_proj": {LINEAR, IDENTITY},
            "mlp_module": {"torch.nn.modules.container.Sequential"},
            "mlp_module.0": {LINEAR},
            "mlp_module.1": {"torch.nn.modules.activation.GELU"},
            "mlp_module.2": {"torch.nn.modules.dropout.Dropout"},
            "mlp_module.3": {LINEAR},
            "mlp_module.4": {"torch.nn.modules.dropout.Dropout"},
            "out_proj": {LINEAR, IDENTITY},
            "norm1": {LAYER_NORM},
            "norm2": {LAYER_NORM},
        }
        layer.update(_prefixed("att_module.sm", SM_PARTS))
        parts.update(_prefixed(f"{PREFIX}.layers.{index}", layer))
    return parts


def _sm_settings(outer: Any, name: str) -> tuple[str, float | str, int]:
    """(mode, alpha, steps) of a torchmil Sm module (ApproxSm / ExactSm inside), read off it."""
    inner = outer.sm
    kind = type(inner).__name__
    mode = "approx" if kind == "ApproxSm" else "exact"
    steps = int(inner.num_steps) if mode == "approx" else int(outer.num_steps)
    if hasattr(inner.coef, "detach"):
        return mode, "trainable", steps
    alpha = float(inner.alpha)
    if not math.isclose(1.0 / (1.0 - alpha) - 1, float(inner.coef), rel_tol=0, abs_tol=0):
        raise _fail(f"{name}.sm.coef {inner.coef!r} is not the one alpha {alpha!r} gives")
    return mode, alpha, steps


def _check_layer_norm(norm: Any, name: str) -> None:
    if float(norm.eps) != LAYER_NORM_EPS or not norm.elementwise_affine or norm.bias is None:
        raise _fail(f"{name} is not torchmil's LayerNorm (eps {LAYER_NORM_EPS:g}, weight and bias)")


def transformer_config(encoder: Any) -> TransformerConfig:
    """Every SmTransformerEncoder setting, read off the live module; its layers must agree."""
    layers = list(encoder.layers)
    settings = []
    for index, layer in enumerate(layers):
        name = f"{PREFIX}.layers.{index}"
        attention = layer.att_module
        if not attention.learn_weights or attention.qkv_nn.bias is not None:
            raise _fail(f"{name}.att_module is not torchmil's learned, bias-free qkv projection")
        gelu = layer.mlp_module[1] if layer.use_mlp else None
        if gelu is not None and gelu.approximate != "none":
            raise _fail(f"{name}.mlp_module.1 is GELU(approximate={gelu.approximate!r}), torchmil's is exact")
        for norm in ("norm1", "norm2"):
            _check_layer_norm(getattr(layer, norm), f"{name}.{norm}")
        settings.append(
            (
                int(attention.att_dim),
                int(attention.n_heads),
                bool(layer.use_mlp),
                float(attention.dropout),
                _sm_settings(attention.sm, f"{name}.att_module.sm"),
            )
        )
    _check_layer_norm(encoder.norm, f"{PREFIX}.norm")
    if any(other != settings[0] for other in settings[1:]):
        raise _fail("the transformer's layers differ in att_dim, n_heads, use_mlp, dropout or Sm settings")
    att_dim, n_heads, use_mlp, dropout, (mode, alpha, steps) = settings[0]
    config = TransformerConfig(
        in_dim=int(layers[0].att_module.qkv_nn.in_features),
        att_dim=att_dim,
        n_layers=len(layers),
        n_heads=n_heads,
        use_mlp=use_mlp,
        add_self=bool(encoder.add_self),
        dropout=dropout,
        sm_alpha=alpha,
        sm_mode=mode,
        sm_steps=steps,
    )
    try:
        check_transformer_config(config)
    except ValueError as err:
        raise _fail(str(err)) from None
    return config


def _class_name(module: Any) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _count_tensors(module: Any) -> int:
    return len(list(module.parameters())) + len(list(module.buffers()))


def check_understood(model: Any, parts: dict[str, set[str]], exported: set[str]) -> None:
    """Refuse any submodule, hook, parameter or buffer of `model` that is not in `parts`/`exported`.

    parts: submodule path -> allowed classes ("module.qualname"); exported: the state-dict names
    smcli rebuilds. Unknown children are named first (with their tensor count), then unknown classes.
    """
    modules = [
        (path, module) for path, module in model.named_modules() if path.split(".")[0] not in IGNORED_CHILDREN
    ]
    for path, module in modules:
        if path not in parts:
            tensors = _count_tensors(module)
            raise _fail(
                f"the model has a part smcli does not know: {path} ({type(module).__name__}, "
                f"{tensors} tensor{'s' if tensors != 1 else ''}); exporting without it would score a "
                "different model"
            )
    for path, module in modules:
        if _class_name(module) not in parts[path]:
            where = path or "the model"
            expected = " or ".join(sorted(name.rsplit(".", 1)[1] for name in parts[path]))
            raise _fail(
                f"{where} is {_class_name(module)}: smcli reproduces only torchmil's {expected} there"
            )
        hooks = ("_forward_hooks", "_forward_pre_hooks")
        if any(getattr(module, name, None) for name in hooks):
            raise _fail(f"{path or 'the model'} has forward hooks: smcli cannot know what they change")
    names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    extra = sorted(
        name for name in names if name not in exported and name.split(".")[0] not in IGNORED_CHILDREN
    )
    if extra:
        shown = ", ".join(extra[:4]) + (", ..." if len(extra) > 4 else "")
        raise _fail(f"the model holds tensors smcli does not rebuild ({shown})")


def _model_parts(model: Any) -> tuple[Any, bool]:
    """(the SmAttentionPool, whether an SmABMIL head is there); refuses a real feature extractor."""
    if hasattr(model, "pool") and hasattr(model, "last_layer"):  # SmABMIL
        feat_ext = getattr(model, "feat_ext", None)
        if feat_ext is not None:
            names = [f"feat_ext.{key}" for key in feat_ext.state_dict()]
            if names:
                raise _fail(feature_extractor_refusal(names))
        return model.pool, True
    if all(hasattr(model, name) for name in ("proj1", "proj2", "sm", "sm_where")):
        return model, False
    raise _fail(f"{type(model).__name__} is not a torchmil SmAttentionPool or SmABMIL")


def dataset_graph(dataset: Any) -> tuple[float, float, GraphOptions]:
    """(patch_size, dist_thr, graph options) of a torchmil ProcessedMILDataset (or subclass)."""
    classes = type(dataset).__mro__
    names = [cls.__name__ for cls in classes]
    if "ProcessedMILDataset" not in names:
        raise _fail(f"dataset {type(dataset).__name__} is not a torchmil ProcessedMILDataset")
    for method in DATASET_GRAPH_METHODS:
        owner = next(cls.__name__ for cls in classes if method in vars(cls))
        if owner not in DATASET_GRIDS and owner != "BinaryClassificationDataset":
            raise _fail(
                f"dataset class {owner} defines its own {method}: smcli cannot know the graph it builds "
                "(export without dataset= and describe the graph with `smcli convert --config`)",
            )
    loader = next(cls.__name__ for cls in classes if "_load_coords" in vars(cls))
    grid = DATASET_GRIDS[loader]
    patch_size = 1.0 if grid == "as-is" else float(dataset.patch_size)
    options = GraphOptions(
        normalize=bool(dataset.norm_adj),
        weights="feature_distance" if dataset.adj_with_dist else "binary",
        origin="min" if grid == "min" else "zero",
    )
    return patch_size, float(dataset.dist_thr), options


def export_config(
    model: Any, *, patch_size: float | None = None, dist_thr: float | None = None, dataset: Any = None
) -> tuple[ModelConfig, dict]:
    """The checkpoint config and tensors of a live torchmil model (see `export_torchmil`)."""
    pool, head = _model_parts(model)
    prefix = "pool." if head else ""
    exported = {prefix + key for key in pool.state_dict()}
    if head:
        exported |= {"last_layer." + key for key in model.last_layer.state_dict()}
    encoder = getattr(model, PREFIX, None) if head else None
    if encoder is not None and _class_name(model) == TRANSFORMER_CLASS:
        exported |= {f"{PREFIX}.{key}" for key in encoder.state_dict()}
        check_understood(model, transformer_parts(len(encoder.layers)), exported)
        transformer = transformer_config(encoder)
    else:
        check_understood(model, smabmil_parts() if head else pool_parts(), exported)
        transformer = None
    config = pool_config(pool)
    graph = GraphOptions()
    if dataset is not None:
        data_patch, data_thr, graph = dataset_graph(dataset)
        for name, given, found in (("patch_size", patch_size, data_patch), ("dist_thr", dist_thr, data_thr)):
            if given is not None and float(given) != found:
                raise _fail(f"{name}={given} contradicts the dataset's {name} {found:g}")
        patch_size, dist_thr = data_patch, data_thr
    for name, value in (("patch_size", patch_size), ("dist_thr", dist_thr)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise _fail(f"{name} must be positive and finite, got {value!r}")
    tensors = {prefix + key: value for key, value in pool.state_dict().items()}
    if head:
        tensors.update({"last_layer." + key: value for key, value in model.last_layer.state_dict().items()})
    if transformer is not None and encoder is not None:
        tensors.update({f"{PREFIX}.{key}": value for key, value in encoder.state_dict().items()})
    tensors = {key: value.detach().to("cpu") for key, value in tensors.items()}
    model_config = ModelConfig(
        config,
        head,
        None if patch_size is None else float(patch_size),
        DEFAULT_DIST_THR if dist_thr is None else float(dist_thr),
        graph=graph,
        transformer=transformer,
    )
    verify_state(build_module(model_config), tensors, Path("export_torchmil"))
    return model_config, tensors


def export_torchmil(
    model: Any,
    path: str | Path,
    *,
    patch_size: float | None = None,
    dist_thr: float | None = None,
    dataset: Any = None,
) -> ModelConfig:
    """Write a live torchmil SmAttentionPool, SmABMIL or SmTransformerABMIL as an smcli checkpoint.

    Returns its config. A transformer trained with dropout is scored without it (a UserWarning
    starting `note:` says so; torchmil applies attention dropout even in eval mode).

    model: the trained module (train or eval mode; it is not changed, spectral-norm u, v are
        taken as stored, which is what torchmil's eval forward uses).
    patch_size: coordinate units per patch step of the bags it will score (the dataset's).
    dist_thr: neighbour distance in patch steps (default sqrt 2).
    dataset: the torchmil dataset it was trained on: patch_size, dist_thr, norm_adj,
        adj_with_dist and the grid convention of its class are read from it.

    Example::

        smcli.export_torchmil(model, "model.safetensors", dataset=train_dataset)
    """
    config, tensors = export_config(model, patch_size=patch_size, dist_thr=dist_thr, dataset=dataset)
    save_checkpoint(tensors, config, Path(path))
    note = dropout_note(config.transformer) if config.transformer is not None else None
    if note is not None:
        warnings.warn(f"note: {note}", UserWarning, stacklevel=2)
    return config
