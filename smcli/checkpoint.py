"""smcli checkpoints: a torchmil state dict in a .safetensors file, its full config in the metadata.

Metadata key `smcli_config` holds JSON:
    {"pool": {in_dim, att_dim, act, sm_mode, sm_alpha, sm_steps, sm_where, spectral_norm},
     "head": bool, "graph": {"patch_size": float | null, "dist_thr": float, "normalize": bool,
     "weights": "binary" | "feature_distance", "origin": "min" | "zero"},
     "smcli_version": str, "training": {...optional recipe},
     "assumed": ["sm_mode=approx", ...]  (settings `convert` took from torchmil defaults; optional),
     "transformer": {in_dim, att_dim, n_layers, n_heads, use_mlp, add_self, dropout, sm_alpha,
                     sm_mode, sm_steps}  (optional: present for SmTransformerABMIL, whose head is true)}
Scoring loads only safetensors (no pickle is ever executed), into numpy: no torch import.
Checkpoints are made by `smcli.convert` (from torchmil training files) and `smcli.export` (from a
live torchmil model).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from smcli.errors import ModelError
from smcli.graph import DEFAULT_DIST_THR, EDGE_WEIGHTS, MAX_DIST_THR, ORIGINS, GraphOptions
from smcli.model import PoolConfig  # the model's constructor arguments; re-exported here
from smcli.numeric import FLOAT32_MAX, count_non_finite
from smcli.transformer import TransformerConfig, check_transformer_config

CONFIG_KEY = "smcli_config"
ACTS = ("tanh", "relu", "gelu")
SM_MODES = ("approx", "exact")
SM_WHERE = ("early", "mid", "late", "none")
MAX_SM_STEPS = 1000  # approx Sm steps; a cap that turns a typo (1e9) into an error, not a hang

Alpha = float | str
# the layers torchmil wraps with spectral norm (proj1, proj2), per sm_where
SPECTRAL_LAYERS = {"early": (True, True), "none": (True, True), "mid": (False, True), "late": (False, False)}


@dataclass(frozen=True)
class ModelConfig:
    pool: PoolConfig
    head: bool = False
    patch_size: float | None = None
    dist_thr: float = DEFAULT_DIST_THR
    training: dict[str, Any] = field(default_factory=dict)
    graph: GraphOptions = GraphOptions()
    assumed: tuple[str, ...] = ()  # "name=value" settings taken from torchmil defaults by convert
    transformer: TransformerConfig | None = None  # SmTransformerABMIL's encoder (head is then true)

    @property
    def kind(self) -> str:
        """The torchmil class this checkpoint reproduces."""
        if self.transformer is not None:
            return "SmTransformerABMIL"
        return "SmABMIL" if self.head else "SmAttentionPool"

    def to_json(self) -> str:
        from smcli import __version__

        document: dict[str, Any] = {
            "pool": asdict(self.pool),
            "head": self.head,
            "graph": {"patch_size": self.patch_size, "dist_thr": self.dist_thr, **asdict(self.graph)},
            "smcli_version": __version__,
        }
        if self.training:
            document["training"] = self.training
        if self.assumed:
            document["assumed"] = list(self.assumed)
        if self.transformer is not None:
            document["transformer"] = asdict(self.transformer)
        return json.dumps(document, sort_keys=True)


@dataclass
class LoadedModel:
    """A checkpoint ready to score: its config, the model (smcli.model), and where it came from."""

    config: ModelConfig
    module: Any  # smcli.model.SmAttentionPool or SmABMIL
    path: Path
    sha256: str
    feature_limit: float = math.inf  # larger |features| could overflow float32 in the projections

    @property
    def in_dim(self) -> int:
        return self.config.pool.in_dim

    @property
    def n_parameters(self) -> int:
        return sum(int(t.size) for t in self.module.state_dict().values())


def _fail(path: Path, message: str) -> ModelError:
    return ModelError(f"{path}: {message}")


def parse_config(text: str, path: Path) -> ModelConfig:
    """Validate the JSON config of a checkpoint; every problem is a one-line ModelError."""
    try:
        document = json.loads(text)
        pool = document["pool"]
        graph = document.get("graph", {})
        alpha = pool.get("sm_alpha", "trainable")
        if alpha != "trainable":
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
                raise ValueError(f"sm_alpha must be 'trainable' or a number, got {alpha!r}")
            alpha = float(alpha)
        config = PoolConfig(
            in_dim=_positive_int(pool["in_dim"], "in_dim"),
            att_dim=_positive_int(pool.get("att_dim", 128), "att_dim"),
            act=str(pool.get("act", "gelu")),
            sm_mode=str(pool.get("sm_mode", "approx")),
            sm_alpha=alpha,
            sm_steps=_non_negative_int(pool.get("sm_steps", 10), "sm_steps"),
            sm_where=str(pool.get("sm_where", "early")),
            spectral_norm=bool(pool.get("spectral_norm", False)),
        )
        check_pool_config(config)
        patch_size = graph.get("patch_size")
        if patch_size is not None:
            patch_size = _positive_float(patch_size, "patch_size")
        dist_thr = _positive_float(graph.get("dist_thr", DEFAULT_DIST_THR), "dist_thr")
        if dist_thr > MAX_DIST_THR:
            raise ValueError(f"dist_thr {dist_thr:g} is beyond {MAX_DIST_THR:g} patch steps")
        training = document.get("training") or {}
        options = parse_graph_options(graph)
        assumed = document.get("assumed") or []
        if not isinstance(assumed, list) or not all(isinstance(item, str) for item in assumed):
            raise ValueError("assumed must be a list of strings")
        head = bool(document.get("head", False))
        transformer = parse_transformer(document.get("transformer"), config, head)
        return ModelConfig(config, head, patch_size, dist_thr, training, options, tuple(assumed), transformer)
    except json.JSONDecodeError as err:
        raise _fail(path, f"config metadata is not valid JSON ({err.msg})") from None
    except KeyError as err:
        raise _fail(path, f"config metadata lacks {err.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise _fail(path, f"invalid config: {err}") from None


TRANSFORMER_KEYS = tuple(TransformerConfig.__dataclass_fields__)


def parse_transformer(section: Any, pool: PoolConfig, head: bool) -> TransformerConfig | None:
    """The `transformer` section of a config (None when absent); ValueError when it does not hold."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ValueError(f"transformer must be an object, got {section!r}")
    unknown = sorted(set(section) - set(TRANSFORMER_KEYS))
    if unknown:
        raise ValueError(f"transformer has unknown settings {', '.join(unknown)}")
    missing = [name for name in TRANSFORMER_KEYS if name not in section]
    if missing:
        raise ValueError(f"transformer lacks {', '.join(missing)}")
    values = dict(section)
    for name in ("use_mlp", "add_self"):
        if not isinstance(values[name], bool):
            raise ValueError(f"transformer {name} must be true or false, got {values[name]!r}")
    for name in ("sm_alpha", "dropout"):
        value = values[name]
        if isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
    config = TransformerConfig(**values)
    if config.in_dim != pool.in_dim:
        raise ValueError(f"transformer in_dim {config.in_dim!r} is not the pool's in_dim {pool.in_dim}")
    check_transformer_config(config)
    if not head:
        raise ValueError("a transformer model has a head (last_layer): head must be true")
    return config


def check_pool_config(config: PoolConfig) -> None:
    """Raise ValueError for values torchmil would reject or that have no defined meaning."""
    if config.act not in ACTS:
        raise ValueError(f"act must be one of {', '.join(ACTS)}, got {config.act!r}")
    if config.sm_mode not in SM_MODES:
        raise ValueError(f"sm_mode must be approx or exact, got {config.sm_mode!r}")
    if config.sm_where not in SM_WHERE:
        raise ValueError(f"sm_where must be one of {', '.join(SM_WHERE)}, got {config.sm_where!r}")
    if config.sm_alpha != "trainable":
        alpha = config.sm_alpha
        if not (isinstance(alpha, float) and 0.0 <= alpha < 1.0):
            raise ValueError(f"sm_alpha must be 'trainable' or a number in [0, 1), got {alpha!r}")
    if config.sm_steps > MAX_SM_STEPS:
        raise ValueError(
            f"sm_steps {config.sm_steps} is beyond {MAX_SM_STEPS} (approx Sm settles in tens of steps; "
            "sm_mode exact is its limit)"
        )


def parse_graph_options(graph: dict) -> GraphOptions:
    """The graph options of a config's graph section (absent keys: torchmil's dataset defaults)."""
    normalize = graph.get("normalize", True)
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be true or false, got {normalize!r}")
    weights = graph.get("weights", "binary")
    if weights not in EDGE_WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(EDGE_WEIGHTS)}, got {weights!r}")
    origin = graph.get("origin", "min")
    if origin not in ORIGINS:
        raise ValueError(f"origin must be one of {', '.join(ORIGINS)}, got {origin!r}")
    return GraphOptions(normalize, weights, origin)


def has_sm(pool: PoolConfig) -> bool:
    """torchmil builds an Sm (not an Identity) for these settings."""
    return pool.sm_steps > 0 and pool.sm_alpha not in (0.0, 0) and pool.sm_where != "none"


def feature_extractor_refusal(names: list[str]) -> str:
    """The message for a model with a feature extractor (SmABMIL feat_ext), naming its tensors."""
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return (
        f"the model has a feature extractor ({shown}): smcli scores precomputed features only; "
        "run it over the patches into the bags, then give smcli the model without it"
    )


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def build_module(config: ModelConfig, seed: int = 0):
    """An smcli model with torchmil's state-dict layout for this config, weights drawn from `seed`."""
    from smcli.model import SmABMIL, SmAttentionPool

    pool = SmAttentionPool(config.pool, seed=seed)
    if config.transformer is not None:
        from smcli.transformer import SmTransformerABMIL

        return SmTransformerABMIL(config.transformer, pool, seed=seed + 2)
    if config.head:
        return SmABMIL(pool, config.pool.in_dim, seed=seed + 1)
    return pool


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(path: str | Path, device: str = "cpu") -> LoadedModel:
    """Read an smcli checkpoint (.safetensors) and build the model it describes, on `device`."""
    path = Path(path)
    if not path.is_file():  # never opened otherwise: a FIFO given as -m would block the run
        raise _fail(path, "not a regular file" if path.exists() else "no such model file")
    from safetensors import SafetensorError

    from smcli.tensorfile import read_safetensors

    try:
        read = read_safetensors(path)
        metadata, tensors = read.metadata, read.tensors
    except PermissionError:
        raise _fail(path, "permission denied") from None
    except (SafetensorError, OSError, ValueError, RuntimeError):
        raise _fail(
            path,
            "not a safetensors checkpoint (smcli scores only .safetensors models; "
            "make one with `smcli convert`)",
        ) from None
    if CONFIG_KEY not in metadata:
        raise _fail(
            path, f"no '{CONFIG_KEY}' metadata: not an smcli checkpoint (make one with `smcli convert`)"
        )
    config = parse_config(metadata[CONFIG_KEY], path)
    check_stored_tensors(path, config, tensors)  # before build_module allocates anything
    module = build_module(config)
    _load_state(module, tensors, path)
    return LoadedModel(config, module.to(device), path, file_sha256(path), feature_limit(module))


def check_stored_tensors(path: Path, config: ModelConfig, tensors: dict) -> None:
    """What must hold before a model is built from `tensors`; each failure is a one-line ModelError.

    - the file holds at least the in_dim x att_dim numbers of proj1 (a config claiming 1e6 x 1e5
      is refused here, not after allocating 400 GB for it);
    - every floating tensor is finite (a NaN weight scores every bag NaN, or 'probability 1.0');
    - the Sm coefficient gives a defined operator (approx divides by 1 + coef).
    """
    pool = config.pool
    stored = sum(int(np.prod(getattr(t, "shape", ()), dtype=np.float64)) for t in tensors.values())
    if pool.in_dim * pool.att_dim > stored:
        raise _fail(
            path,
            f"the config's in_dim {pool.in_dim} x att_dim {pool.att_dim} needs "
            f"{pool.in_dim * pool.att_dim:,} weights, the file holds {stored:,} numbers",
        )
    transformer = config.transformer
    if transformer is not None:  # the qkv projections alone, before anything is allocated
        needed = sum(3 * transformer.att_dim * in_l for in_l, _ in transformer.layer_dims())
        if needed > stored:
            raise _fail(
                path,
                f"the config's transformer ({transformer.n_layers} layers, att_dim {transformer.att_dim}) "
                f"needs {needed:,} qkv weights, the file holds {stored:,} numbers",
            )
    for name in sorted(tensors):
        if _is_floating(tensors[name]):
            bad = count_non_finite(np.asarray(tensors[name]))
            if bad:
                raise _fail(path, f"tensor {name} has {bad} non-finite values (NaN or inf)")
    modes = {"sm.sm.coef": pool.sm_mode, "pool.sm.sm.coef": pool.sm_mode}
    if config.transformer is not None:  # each encoder layer's Sm
        modes.update({k: config.transformer.sm_mode for k in tensors if k.endswith("att_module.sm.sm.coef")})
    for key, mode in modes.items():
        coef = tensors.get(key)
        if coef is not None and _is_floating(coef) and np.asarray(coef).size == 1 and mode == "approx":
            value = float(np.asarray(coef, dtype=np.float64).reshape(()))
            if 1.0 + value == 0.0:
                raise _fail(path, f"{key} is {value:g}: approx Sm divides by 1 + coef")


def feature_limit(module) -> float:
    """The largest |feature| the model takes without overflowing float32 in proj1 (or the head).

    |x W1^T + b1| <= max|x| * max_j ||W1_j||_1 + max|b1|, and the head's |w . z + b| likewise with
    z a convex combination of rows; a quarter of float32's range is left for Sm and activations.
    """
    if hasattr(module, "feature_limit"):  # SmTransformerABMIL: the features meet the encoder first
        return module.feature_limit()
    pool = getattr(module, "pool", module)
    budget = FLOAT32_MAX / 4
    limits = []
    for weight, bias in [(pool.weight("proj1"), pool.params["proj1.bias"])] + (
        [(module.head["weight"], module.head["bias"])] if hasattr(module, "head") else []
    ):
        row_l1 = float(np.abs(np.asarray(weight, dtype=np.float64)).sum(axis=1).max(initial=0.0))
        offset = float(np.abs(np.asarray(bias, dtype=np.float64)).max(initial=0.0))
        if row_l1 > 0:
            limits.append(max(budget - offset, 0.0) / row_l1)
    return min(limits, default=math.inf)


def _is_floating(tensor) -> bool:
    """numpy or torch: a floating-point dtype (an Unreadable float8 is not one smcli can use)."""
    if hasattr(tensor, "is_floating_point"):
        return bool(tensor.is_floating_point())
    return getattr(getattr(tensor, "dtype", None), "kind", "") == "f"


def _load_state(module, tensors: dict, path: Path) -> None:
    result_problems = []
    expected = module.shapes()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        result_problems.append("missing " + ", ".join(missing))
    if unexpected:
        result_problems.append("unexpected " + ", ".join(unexpected))
    for key in sorted(set(expected) & set(tensors)):
        if tuple(expected[key]) != tuple(tensors[key].shape):
            result_problems.append(
                f"{key} has shape {tuple(tensors[key].shape)}, the config needs {tuple(expected[key])}"
            )
        elif not _is_floating(tensors[key]):
            result_problems.append(f"{key} has dtype {tensors[key].dtype}, expected floating point")
    if result_problems:
        raise _fail(path, "tensors do not fit the config: " + "; ".join(result_problems))
    module.load_state_dict(tensors, strict=True)


def verify_state(module, tensors: dict, path: Path) -> None:
    """Load `tensors` into `module` strictly; a ModelError names every tensor that does not fit."""
    _load_state(module, tensors, path)


def save_checkpoint(tensors: dict, config: ModelConfig, out: Path) -> None:
    """Write tensors (numpy or torch; bfloat16 widened to float32) + config as a checkpoint, atomically."""
    from smcli.files import atomic_path
    from smcli.model import to_numpy
    from smcli.tensorfile import write_safetensors

    payload = {key: to_numpy(value) for key, value in tensors.items()}
    with atomic_path(out) as tmp:
        write_safetensors(tmp, payload, {CONFIG_KEY: config.to_json()})


def with_training(config: ModelConfig, training: dict) -> ModelConfig:
    return replace(config, training=training)
