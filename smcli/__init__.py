"""smcli: per-patch Sm attention for whole-slide bags, identical to torchmil 1.0.2.

Python API (the CLI is built on it)::

    from smcli import load_model, load_bag, score_bag
    model = load_model("sample_bags/models/sm_abmil.safetensors")
    result = score_bag(model, load_bag("sample_bags/slide_01.safetensors"))
    result.table      # pandas DataFrame: bag_id, instance, x, y, attention_logit, attention_weight
    result.summary    # BagSummary: n_edges, logit, probability, auroc, patch_step, ...

`export_torchmil(model, "model.safetensors", dataset=train_dataset)` writes a checkpoint from a
live torchmil model, every setting read off the module. `score_bags(paths, model)` yields one
result per bag, reading the next bag while scoring the current one. Names are imported lazily
so that `import smcli` (and `smcli --help`) stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "load_model": "smcli.checkpoint",
    "load_ensemble": "smcli.ensemble",
    "load_bag": "smcli.bags",
    "score_bag": "smcli.scoring",
    "score_bags": "smcli.scoring",
    "ScoreOptions": "smcli.scoring",
    "BagKeys": "smcli.bags",
    "export_torchmil": "smcli.export",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'smcli' has no attribute {name!r}")
