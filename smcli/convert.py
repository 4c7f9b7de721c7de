"""`smcli convert`: a torchmil training file (.pt / .ckpt) -> smcli checkpoint, nothing assumed quietly.

Accepts what training code saves: a bare state dict; `{"state_dict" | "model_state_dict" | "model":
...}` wrappers; key prefixes `model.` (torchmil's Trainer wraps the model in MILModelWrapper),
`module.` (DistributedDataParallel) and `_orig_mod.` (torch.compile), in any combination; a
Lightning checkpoint, whose `hyper_parameters` give settings they name. The file is read with
torch.load(weights_only=True): no pickled code ever runs.

Every setting comes from, in this order: a flag > the --config file (JSON) > hyper_parameters >
the tensors > torchmil's default. The tensors are facts: a flag, config or hyper_parameters that
contradicts them is an error. A setting that falls through to torchmil's default is an
*assumption*: an error by default (a different default is a silently different model), allowed
with `assume_defaults` (then listed in `ConvertResult.assumed` and recorded in the checkpoint).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from smcli.checkpoint import (
    ACTS,
    SM_MODES,
    SM_WHERE,
    SPECTRAL_LAYERS,
    ModelConfig,
    PoolConfig,
    build_module,
    check_pool_config,
    feature_extractor_refusal,
    has_sm,
    save_checkpoint,
    verify_state,
)
from smcli.errors import ModelError, UsageError
from smcli.graph import DEFAULT_DIST_THR, EDGE_WEIGHTS, MAX_DIST_THR, ORIGINS, GraphOptions
from smcli.transformer import PREFIX, TransformerConfig, check_transformer_config, dropout_note

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")  # dicts that hold the state dict
PREFIXES = ("model.", "module.", "_orig_mod.")  # Trainer wrapper, DDP, torch.compile
IGNORED_PREFIXES = ("criterion.",)  # SmABMIL's loss (e.g. BCEWithLogitsLoss pos_weight): not scored
LIGHTNING_DICTS = (  # Lightning stores hyper_parameters as these dict subclasses: read as plain dicts
    "lightning.fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
)
# the settings, in the order notes list them
SETTINGS = (
    "in_dim",
    "att_dim",
    "act",
    "sm_mode",
    "sm_alpha",
    "sm_steps",
    "sm_where",
    "spectral_norm",
    "patch_size",
    "dist_thr",
    "normalize",
    "weights",
    "origin",
    # SmTransformerABMIL's encoder (torchmil's transf_* arguments; n_heads is never in the tensors)
    "n_heads",
    "transf_att_dim",
    "transf_n_layers",
    "transf_use_mlp",
    "transf_add_self",
    "transf_dropout",
    "transf_sm_alpha",
    "transf_sm_mode",
    "transf_sm_steps",
)
# names people use for them (torchmil's constructor and dataset arguments) -> smcli's name
ALIASES = {
    "att_act": "act",
    "norm_adj": "normalize",
    "adj_with_dist": "weights",
    "in_shape": "in_dim",
    "transf_n_heads": "n_heads",
    # SmTransformerABMIL's names for its pool's settings
    "pool_att_dim": "att_dim",
    "pool_act": "act",
    "pool_sm_mode": "sm_mode",
    "pool_sm_alpha": "sm_alpha",
    "pool_sm_steps": "sm_steps",
    "pool_sm_where": "sm_where",
    "pool_spectral_norm": "spectral_norm",
}
# hyper_parameters are read by torchmil's names only: a training script's own `weights` or
# `origin` could mean anything (class weights, ...), torchmil's names mean what torchmil does
SMCLI_ONLY = ("normalize", "weights", "origin")


FLAGS = "flags"


@dataclass(frozen=True)
class ConvertOptions:
    """Flags of `smcli convert`; None means not given."""

    act: str | None = None
    sm_mode: str | None = None
    sm_alpha: float | str | None = None
    sm_steps: int | None = None
    sm_where: str | None = None
    patch_size: float | None = None
    dist_thr: float | None = None
    normalize: bool | None = None
    weights: str | None = None
    origin: str | None = None
    config: Path | None = None  # JSON file of torchmil constructor and graph settings
    strict: bool = False  # accepted for old scripts: an assumption is an error anyway
    assume_defaults: bool = False  # take torchmil's default for a setting nothing gives
    overwrite: bool = False  # replace an existing output file
    n_heads: int | None = None  # SmTransformerABMIL's transf_n_heads

    def given(self) -> dict[str, Any]:
        """The settings given as flags."""
        values = ((f.name, getattr(self, f.name)) for f in fields(self))
        return {name: value for name, value in values if name in SETTINGS and value is not None}


@dataclass
class ConvertResult:
    config: ModelConfig
    assumed: tuple[str, ...]  # "name=value" taken from torchmil defaults
    found: str  # what the file held, e.g. "Lightning checkpoint, prefix model. removed"
    notes: list[str] = field(default_factory=list)


def _fail(path: Path, message: str) -> ModelError:
    return ModelError(f"{path}: {message}")


# --- reading the file --------------------------------------------------------------------------


def read_training_file(path: Path) -> tuple[dict, dict, str]:
    """(state dict with wrappers and prefixes removed, hyper_parameters or {}, what was found)."""
    import pickle

    from smcli.backends.torch_device import require_torch

    if not path.is_file():
        raise _fail(path, "no such file")
    torch = require_torch(f"{path}: reading a .pt/.ckpt training file")
    try:
        with torch.serialization.safe_globals([(dict, name) for name in LIGHTNING_DICTS]):
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[-1] if str(err).strip() else "unsafe pickle"
        raise _fail(path, f"refused to load: not a plain state dict ({first_line.strip()})") from None
    except PermissionError:
        raise _fail(path, "permission denied") from None
    except Exception as err:  # torch raises many kinds for garbage input
        raise _fail(path, f"cannot read as a torch checkpoint ({type(err).__name__})") from None
    if not isinstance(loaded, dict):
        raise _fail(path, f"holds a {type(loaded).__name__}, not a state dict")

    def is_state(value: Any) -> bool:
        return (
            isinstance(value, dict)
            and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
        )

    hyper_parameters: dict = {}
    if is_state(loaded):
        state, found = loaded, "bare state dict"
    else:
        wrapper = next((key for key in WRAPPER_KEYS if is_state(loaded.get(key))), None)
        if wrapper is None:
            keys = ", ".join(sorted(map(str, loaded))[:6])
            raise _fail(
                path,
                f"holds no state dict (a mapping of names to tensors) at the top or under "
                f"{', '.join(WRAPPER_KEYS)}; its keys: {keys}",
            )
        state = loaded[wrapper]
        found = f"{wrapper!r} of a checkpoint dict"
        if isinstance(loaded.get("hyper_parameters"), dict):
            hyper_parameters = dict(loaded["hyper_parameters"])
            found = "Lightning checkpoint"
    state, removed = strip_prefixes(state)
    if removed:
        found += ", prefix " + "".join(removed) + " removed"
    return state, hyper_parameters, found


def strip_prefixes(state: dict) -> tuple[dict, list[str]]:
    """Remove wrapper prefixes (model., module., _orig_mod.) shared by every key, repeatedly."""
    removed: list[str] = []
    while True:
        prefix = next((p for p in PREFIXES if all(key.startswith(p) for key in state)), None)
        if prefix is None:
            return state, removed
        state = {key[len(prefix) :]: value for key, value in state.items()}
        removed.append(prefix)


# --- settings from flags, config files and hyper_parameters --------------------------------------


def _check_value(name: str, value: Any) -> Any:
    """A setting in smcli's terms, or ValueError saying what is wrong with it."""
    if name in (
        "in_dim",
        "att_dim",
        "sm_steps",
        "n_heads",
        "transf_att_dim",
        "transf_n_layers",
        "transf_sm_steps",
    ):
        non_negative = name.endswith("sm_steps")
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if non_negative else 1):
            raise ValueError(f"{name} must be a {'non-negative' if non_negative else 'positive'} integer")
        return value
    if name in ("transf_use_mlp", "transf_add_self"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false")
        return value
    if name == "transf_dropout":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError("transf_dropout must be a number in [0, 1)")
        return float(value)
    if name == "transf_sm_alpha":
        name = "sm_alpha"  # same rule as the pool's alpha
    if name == "transf_sm_mode":
        name = "sm_mode"
    if name in ("patch_size", "dist_thr"):
        if value is None and name == "patch_size":
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value > 0)
        ):
            raise ValueError(f"{name} must be a positive number")
        if name == "dist_thr" and value > MAX_DIST_THR:  # scoring refuses it at load: so does convert
            raise ValueError(f"dist_thr {value:g} is beyond {MAX_DIST_THR:g} patch steps")
        return float(value)
    if name in ("spectral_norm", "normalize"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false")
        return value
    if name == "sm_alpha":
        if value == "trainable":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError("sm_alpha must be 'trainable' or a number in [0, 1)")
        return float(value)
    choices = {
        "act": ACTS,
        "sm_mode": SM_MODES,
        "sm_where": SM_WHERE,
        "weights": EDGE_WEIGHTS,
        "origin": ORIGINS,
    }
    if value not in choices[name]:
        raise ValueError(f"{name} must be one of {', '.join(choices[name])}")
    return value


def settings_from(document: dict, *, unknown_is_error: bool) -> dict[str, Any]:
    """smcli settings from torchmil-style names (aliases resolved, values checked).

    unknown_is_error: a --config file (any other key is an error); else hyper_parameters, read
    by torchmil's names only, other keys ignored. Raises ValueError naming the key.
    """
    settings: dict[str, Any] = {}
    for key, value in document.items():
        name = ALIASES.get(key, key)
        if name not in SETTINGS or (not unknown_is_error and key in SMCLI_ONLY):
            if unknown_is_error:
                raise ValueError(
                    f"unknown key {key!r} (known: {', '.join(sorted(SETTINGS + tuple(ALIASES)))})"
                )
            continue
        if key == "adj_with_dist":
            if not isinstance(value, bool):
                raise ValueError("adj_with_dist must be true or false")
            value = "feature_distance" if value else "binary"
        elif key == "in_shape":
            if not (isinstance(value, (list, tuple)) and len(value) == 1):
                raise ValueError("in_shape must be a one-element list, (in_dim,)")
            value = value[0]
        try:
            value = _check_value(name, value)
        except ValueError as err:
            raise ValueError(f"{key}: {err}, got {value!r}") from None
        if name in settings and settings[name] != value:
            raise ValueError(f"{key} = {value!r} contradicts another key for {name} ({settings[name]!r})")
        settings[name] = value
    return settings


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings of a --config JSON file; any problem is a UsageError naming the file."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read ({type(err).__name__})") from None
    except json.JSONDecodeError as err:
        raise UsageError(
            f"{path}: not valid JSON ({err.msg}, line {err.lineno}); --config reads JSON only"
        ) from None
    if not isinstance(document, dict):
        raise UsageError(f"{path}: the config must be a JSON object of settings")
    try:
        return settings_from(document, unknown_is_error=True)
    except ValueError as err:
        raise UsageError(f"{path}: {err}") from None


# --- what the tensors say ----------------------------------------------------------------------


@dataclass(frozen=True)
class TensorFacts:
    """What a torchmil state dict proves: class, dimensions, spectral-norm layout, trainable coef."""

    head: bool
    in_dim: int
    att_dim: int
    spectral: tuple[bool, bool]  # proj1, proj2 wrapped
    has_coef: bool
    encoder: EncoderFacts | None = None  # SmTransformerABMIL


@dataclass(frozen=True)
class EncoderFacts:
    """What an SmTransformerEncoder's tensors prove (n_heads, add_self, Sm mode and steps they do not)."""

    in_dim: int
    att_dim: int
    n_layers: int
    use_mlp: bool
    has_coef: bool


def encoder_facts(state: dict, path: Path) -> EncoderFacts:
    """Dimensions of `transformer_encoder.*` tensors; a layout torchmil does not build is an error."""
    layers = sorted({int(key.split(".")[2]) for key in state if key.startswith(f"{PREFIX}.layers.")})
    if not layers or layers != list(range(len(layers))):
        raise _fail(path, f"{PREFIX} tensors without layers 0..n-1 (found layers {layers})")
    qkv = state.get(f"{PREFIX}.layers.0.att_module.qkv_nn.weight")
    if qkv is None or qkv.ndim != 2 or qkv.shape[0] % 3:
        raise _fail(path, f"no {PREFIX}.layers.0.att_module.qkv_nn.weight of shape (3 att_dim, in_dim)")
    return EncoderFacts(
        in_dim=int(qkv.shape[1]),
        att_dim=int(qkv.shape[0]) // 3,
        n_layers=len(layers),
        use_mlp=f"{PREFIX}.layers.0.mlp_module.0.weight" in state,
        has_coef=f"{PREFIX}.layers.0.att_module.sm.sm.coef" in state,
    )


def tensor_facts(state: dict, path: Path) -> tuple[dict, TensorFacts]:
    """(the state dict to save, its facts); feat_ext tensors and foreign tensors are errors."""
    feat_ext = sorted(key for key in state if key.startswith("feat_ext."))
    if feat_ext:
        raise _fail(path, feature_extractor_refusal(feat_ext))
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    head = any(key.startswith("pool.") for key in state)
    pool_state = {k[len("pool.") :]: v for k, v in state.items() if k.startswith("pool.")} if head else state
    encoder = encoder_facts(state, path) if any(k.startswith(f"{PREFIX}.") for k in state) else None
    if head:
        known = ("pool.", "last_layer.") + ((f"{PREFIX}.",) if encoder is not None else ())
        others = sorted(k for k in state if not k.startswith(known))
        if others:
            kind = "SmTransformerABMIL" if encoder is not None else "SmABMIL"
            raise _fail(path, f"unexpected tensors for an {kind} state dict: " + ", ".join(others[:5]))
    elif encoder is not None:
        raise _fail(
            path, f"{PREFIX} tensors without pool.* and last_layer.*: not a torchmil SmTransformerABMIL"
        )
    spectral = (
        "proj1.parametrizations.weight.original" in pool_state,
        "proj2.parametrizations.weight.original" in pool_state,
    )
    weight1 = pool_state.get("proj1.parametrizations.weight.original", pool_state.get("proj1.weight"))
    if weight1 is None or weight1.ndim != 2:
        keys = ", ".join(sorted(state)[:5])
        raise _fail(path, f"no proj1 weight: not a torchmil SmAttentionPool or SmABMIL state dict ({keys})")
    att_dim, in_dim = (int(s) for s in weight1.shape)
    return state, TensorFacts(head, in_dim, att_dim, spectral, "sm.sm.coef" in pool_state, encoder)


# --- resolution --------------------------------------------------------------------------------


@dataclass
class _Resolver:
    """Picks each setting from the first source that names it; records what was assumed."""

    sources: list[tuple[str, dict[str, Any]]]  # (label, settings), highest precedence first
    path: Path
    assumed: list[str] = field(default_factory=list)

    def given(self, name: str) -> tuple[Any, str] | None:
        """(value, where it was said, e.g. "--sm-where late") from the first source naming it."""
        found = self.every(name)
        return found[0] if found else None

    def every(self, name: str) -> list[tuple[Any, str]]:
        return [
            (settings[name], _statement(label, name, settings[name]))
            for label, settings in self.sources
            if name in settings
        ]

    def pick(self, name: str, default: Any, matters: bool = True) -> Any:
        found = self.given(name)
        if found is not None:
            return found[0]
        if matters:
            self.assumed.append(f"{name}={_show(default)}")
        return default

    def fail(self, message: str) -> ModelError:
        return _fail(self.path, message)


def _statement(label: str, name: str, value: Any) -> str:
    """How a source said it: "--sm-where late", "config c.json: sm_where late"."""
    if label == FLAGS:
        return f"--{name.replace('_', '-')} {_show(value)}"
    return f"{label}: {name} {_show(value)}"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _spectral_text(spectral: tuple[bool, bool]) -> str:
    return "proj1 and proj2" if all(spectral) else "proj1 only" if spectral[0] else "proj2 only"


def resolve(facts: TensorFacts, resolver: _Resolver) -> ModelConfig:
    """The checkpoint config: facts from the tensors, the rest by precedence (see module doc)."""
    for name in ("in_dim", "att_dim"):
        for value, said in resolver.every(name):
            if value != getattr(facts, name):
                raise resolver.fail(
                    f"{said} contradicts the tensors: they have {name} {getattr(facts, name)}"
                )

    where_given = resolver.given("sm_where")
    alpha_given = resolver.given("sm_alpha")
    if where_given is not None:
        where, said = where_given
        if any(facts.spectral) and SPECTRAL_LAYERS[where] != facts.spectral:
            raise resolver.fail(
                f"spectral-norm tensors on {_spectral_text(facts.spectral)} do not fit {said} "
                "(torchmil wraps proj1 and proj2 for early/none, proj2 for mid, nothing for late)"
            )
        if where == "none" and facts.has_coef:
            raise resolver.fail(
                f"{said} contradicts the tensors: sm.sm.coef is there, so the model has an Sm"
            )
    elif facts.spectral == (False, True):
        where = "mid"  # torchmil wraps proj2 alone only for mid
    elif facts.spectral == (True, True) and facts.has_coef:
        where = "early"  # none has no Sm, hence no coef
    elif facts.has_coef or alpha_given is not None:
        where = resolver.pick("sm_where", "early")
    else:
        raise resolver.fail(
            "no sm.sm.coef tensor, so alpha was not trainable: give sm_alpha (a float) "
            "or sm_where none (no Sm) with a flag or --config"
        )

    steps_given = resolver.given("sm_steps")
    steps_zero = steps_given is not None and steps_given[0] == 0
    if facts.has_coef:
        if alpha_given is not None and alpha_given[0] != "trainable":
            raise resolver.fail(
                f"{alpha_given[1]} contradicts the tensors: sm.sm.coef is present, so alpha was trainable"
            )
        alpha: float | str = "trainable"
    elif alpha_given is not None:
        alpha = alpha_given[0]
        if alpha == "trainable" and where != "none" and not steps_zero:
            raise resolver.fail(f"{alpha_given[1]} contradicts the tensors: there is no sm.sm.coef tensor")
    elif where == "none" or steps_zero:
        alpha = "trainable"  # no Sm: alpha plays no part
    else:
        raise resolver.fail(
            "no sm.sm.coef tensor, so alpha was not trainable: "
            "give sm_alpha (a float) with a flag or --config"
        )

    probe = PoolConfig(facts.in_dim, facts.att_dim, "tanh", "approx", alpha, 1, where)
    smoothing = has_sm(probe) and not steps_zero
    mode = resolver.pick("sm_mode", "approx", matters=smoothing)
    steps = resolver.pick("sm_steps", 10, matters=smoothing and mode == "approx")
    act = resolver.pick("act", "tanh" if facts.head else "gelu")

    spectral_norm = any(facts.spectral)
    for value, said in resolver.every("spectral_norm"):
        wrapped = SPECTRAL_LAYERS[where] if value else (False, False)
        if wrapped != facts.spectral:
            found = _spectral_text(facts.spectral) if any(facts.spectral) else "no layer"
            raise resolver.fail(
                f"{said} contradicts the tensors: they have spectral norm on {found} (sm_where {where})"
            )

    pool = PoolConfig(facts.in_dim, facts.att_dim, act, mode, alpha, steps, where, spectral_norm)
    patch_size = resolver.pick("patch_size", None, matters=False)  # None: the bag's, at score time
    dist_thr = resolver.pick("dist_thr", DEFAULT_DIST_THR, matters=smoothing)
    graph = GraphOptions(
        normalize=resolver.pick("normalize", True, matters=smoothing),
        weights=resolver.pick("weights", "binary", matters=smoothing),
        origin=resolver.pick("origin", "min", matters=smoothing),
    )
    try:
        check_pool_config(pool)
    except ValueError as err:
        raise resolver.fail(str(err)) from None
    transformer = None if facts.encoder is None else resolve_encoder(facts.encoder, resolver)
    if transformer is not None and transformer.in_dim != pool.in_dim:
        raise resolver.fail(
            f"the encoder's in_dim {transformer.in_dim} is not the pool's {pool.in_dim}: not a torchmil model"
        )
    assumed = tuple(sorted(resolver.assumed, key=lambda item: SETTINGS.index(item.partition("=")[0])))
    return ModelConfig(
        pool, facts.head, patch_size, dist_thr, graph=graph, assumed=assumed, transformer=transformer
    )


def resolve_encoder(facts: EncoderFacts, resolver: _Resolver) -> TransformerConfig:
    """SmTransformerABMIL's encoder settings: dimensions from the tensors, n_heads required, the
    rest by precedence (torchmil's SmTransformerABMIL defaults assumed aloud)."""
    for name, found in (
        ("transf_att_dim", facts.att_dim),
        ("transf_n_layers", facts.n_layers),
        ("transf_use_mlp", facts.use_mlp),
    ):
        for value, said in resolver.every(name):
            if value != found:
                raise resolver.fail(f"{said} contradicts the tensors: they have {name} {_show(found)}")
    heads = resolver.given("n_heads")
    if heads is None:
        raise resolver.fail(
            "n_heads is not in the tensors: give --n-heads (or transf_n_heads in --config); "
            f"it must divide att_dim {facts.att_dim}"
        )
    alpha_given = resolver.given("transf_sm_alpha")
    if facts.has_coef:
        if alpha_given is not None and alpha_given[0] != "trainable":
            raise resolver.fail(
                f"{alpha_given[1]} contradicts the tensors: the encoder's sm.sm.coef is there, so its "
                "alpha was trainable"
            )
        alpha: float | str = "trainable"
    elif alpha_given is None or alpha_given[0] == "trainable":
        raise resolver.fail(
            "the encoder has no sm.sm.coef tensor, so its alpha was not trainable: give transf_sm_alpha "
            "(a float) in --config"
        )
    else:
        alpha = alpha_given[0]
    mode = resolver.pick("transf_sm_mode", "approx")
    steps = resolver.pick("transf_sm_steps", 10, matters=mode == "approx")
    if facts.n_layers > 1 and facts.att_dim != facts.in_dim:  # torchmil cannot run add_self there
        add_self = resolver.pick("transf_add_self", False, matters=False)
    else:
        add_self = resolver.pick("transf_add_self", True)
    dropout = resolver.pick("transf_dropout", 0.0, matters=False)  # never applied when scoring
    config = TransformerConfig(
        facts.in_dim,
        facts.att_dim,
        facts.n_layers,
        heads[0],
        facts.use_mlp,
        add_self,
        dropout,
        alpha,
        mode,
        steps,
    )
    try:
        check_transformer_config(config)
    except ValueError as err:
        raise resolver.fail(str(err)) from None
    return config


def overridden(resolver: _Resolver) -> list[str]:
    """Where a higher-precedence source replaced a different value, e.g. a flag over the
    file's own hyper_parameters: legitimate, but said aloud (the model may not be what it says)."""
    notes = []
    for name in SETTINGS:
        said = resolver.every(name)
        lower = [text for value, text in said[1:] if value != said[0][0]] if said else []
        if lower:
            notes.append(f"{said[0][1]} overrides {', '.join(lower)}")
    return notes


def convert_state(
    state: dict, hyper_parameters: dict, options: ConvertOptions, path: Path
) -> tuple[ModelConfig, list[str]]:
    """Config for a torchmil state dict (prefixes already removed), and the overrides to note.

    Raises ModelError (the file, the tensors, a contradiction) or UsageError (flags, --config).
    """
    state, facts = tensor_facts(state, path)
    flags = options.given()
    for name, value in flags.items():
        try:
            _check_value(name, value)
        except ValueError as err:
            raise UsageError(f"--{name.replace('_', '-')}: {err}, got {value!r}") from None
    sources = [(FLAGS, flags)]
    if options.config is not None:
        sources.append((f"config {options.config}", read_config_file(options.config)))
    if hyper_parameters:
        try:
            sources.append(("hyper_parameters", settings_from(hyper_parameters, unknown_is_error=False)))
        except ValueError as err:
            raise _fail(path, f"hyper_parameters: {err}") from None
    resolver = _Resolver(sources, path)
    config = resolve(facts, resolver)
    if options.strict and options.assume_defaults:
        raise UsageError("--strict and --assume-defaults exclude each other")
    if config.assumed and not options.assume_defaults:
        raise _fail(path, missing_settings_message(config.assumed))
    verify_state(build_module(config), state, path)  # every tensor must fit, strictly
    notes = overridden(resolver)
    note = dropout_note(config.transformer) if config.transformer is not None else None
    return config, notes + ([note] if note else [])


FLAG_OF = {  # the `smcli convert` flag that gives each setting; the others go in --config
    **{
        name: "--" + name.replace("_", "-") for name in ("act", "sm_mode", "sm_alpha", "sm_steps", "sm_where")
    },
    **{name: "--" + name.replace("_", "-") for name in ("patch_size", "dist_thr", "weights", "origin")},
    "normalize": "--normalize/--no-normalize",
    "transf_n_heads": "--n-heads",
}


def missing_settings_message(assumed: tuple[str, ...]) -> str:
    """One line: the settings nothing gave, the flag for each, and the way to accept defaults."""
    names = [item.partition("=")[0] for item in assumed]
    flags = ", ".join(f"{name} ({FLAG_OF.get(name, '--config')})" for name in names)
    return (
        f"the file does not record {flags}; give them as flags or in --config, "
        f"or pass --assume-defaults to take torchmil's {', '.join(assumed)}"
    )


def convert(pt_path: Path, out: Path, options: ConvertOptions) -> ConvertResult:
    """`smcli convert`: torchmil training file -> smcli checkpoint (.safetensors), atomically."""
    from smcli.errors import OutputError
    from smcli.files import prepare_file_output

    out = Path(out)
    if out.exists() and not options.overwrite:  # before the file is read: fail fast
        raise UsageError(f"{out}: output exists; pass --overwrite to replace it")
    state, hyper_parameters, found = read_training_file(pt_path)
    config, notes = convert_state(state, hyper_parameters, options, pt_path)
    kept = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    prepare_file_output(out, options.overwrite, UsageError)  # a missing parent directory is created
    try:
        save_checkpoint(kept, config, out)
    except OSError as err:
        raise OutputError(f"{out}: cannot write ({err.strerror or type(err).__name__})") from None
    return ConvertResult(config, config.assumed, found, notes)
