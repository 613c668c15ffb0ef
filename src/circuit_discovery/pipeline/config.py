"""Run configuration: one dataclass with defaults that work, loadable from TOML and overridable from the CLI."""
from __future__ import annotations

import dataclasses
import functools
import logging
import numbers
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from circuit_discovery.errors import CircuitDiscoveryError

log = logging.getLogger(__name__)


class ConfigError(CircuitDiscoveryError, ValueError):
    """A configuration file or option that cannot be used."""


class OutputError(CircuitDiscoveryError, OSError):
    """The output folder cannot be created or written."""


#: (option, least value, why): a configuration asking for fewer draws or facts than a test needs is refused.
MINIMUMS = (
    ("n_random", 19, "a matched random-circuit baseline needs >= 19 draws to reach p < 0.05; >= 100 for p < 0.01, "
                     "which the 'validated' label requires"),
    ("max_facts", 4, "the discovery facts are split in two halves of >= 2 for the split-half circuits of "
                     "shared_mechanism"),
    ("held_out_facts", 2, "a bootstrap interval of held-out faithfulness needs >= 2 held-out facts"),
    ("causal_samples", 2, "the noise of causal tracing is averaged over >= 2 samples (ROME: 10)"),
    ("quick_facts", 4, "with quick, max_facts becomes quick_facts (max_facts needs >= 4)"),
    ("quick_held_out", 2, "with quick, held_out_facts becomes quick_held_out (held_out_facts needs >= 2)"),
)

#: (option, least, greatest, what the value means): numeric ranges of the other options (None: no bound). Each is
#: what the code that reads the option accepts; a value outside would fail only when that stage runs.
RANGES = (
    ("seed", 0, None, "a NumPy generator seed"),
    ("sae_seed", 0, None, "a NumPy generator seed"),
    ("known_k", 1, None, "the answer's rank must be <= known_k"),
    ("batch_size", 1, None, "prompts per forward pass"),
    ("quick_relations", 1, None, "relations of a quick run"),
    ("patching_facts", 0, None, "prompts of the patching heatmap; 0: every discovery pair"),
    ("ig_steps", 1, None, "EAP-IG interpolation steps"),
    ("node_threshold", 0.0, 1.0, "a share of the influence"),
    ("edge_threshold", 0.0, 1.0, "a share of the influence"),
    ("min_metric_gap", 0.0, None, "a logit gap"),
    ("graphs_per_relation", 0, None, "graphs exported per relation"),
    ("causal_facts", 1, None, "facts traced per relation"),
    ("causal_full_facts", 0, None, "facts traced at every token; 0: no full trace"),
    ("sae_training_tokens", 1, None, "training tokens per transcoder"),
    ("sae_k", 1, None, "active latents per token"),
    ("sae_eval_tokens", 0, None, "held-out tokens for the metrics; 0: skip them"),
    ("sae_corpus_sequences", 1, None, "corpus sequences; leave it out for the built-in corpus"),
    ("feature_facts", 1, None, "discovery facts of the feature graphs"),
    ("feature_nodes", 1, None, "feature nodes per prompt graph"),
    ("steer_features", 0, None, "features ablated and steered; 0: no features_matter data"),
    ("steer_random", 0, None, "random draws of the steering baseline"),
    ("feature_context_tokens", 0, None, "tokens searched for top contexts; 0: none"),
    ("feature_max_edges", 0, None, "edges of a feature circuit kept in circuits.json"),
)

#: held-out baselines a run can compute (``RunConfig.baselines``; computed in ``circuit_stage.circuit_validation``)
BASELINES = ("matched", "component_role", "top_m", "last_token")

#: ``RunConfig.circuit_search`` (read by ``circuit_stage.circuit_for_relation``)
CIRCUIT_SEARCHES = ("eap", "refine")

#: ``RunConfig.sae_kind``: the transcoders a run trains (read by ``sae.dictionaries.train_transcoders``);
#: ``clt`` is one cross-layer transcoder
SAE_KINDS = ("topk_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder", "clt")

#: ``RunConfig.device``: what :func:`circuit_discovery.models.loading.resolve_device` accepts (whether the device
#: exists here is checked when the model is loaded)
DEVICES = ("auto", "cpu", "mps", "cuda", "cuda:N")
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

#: options that name files or folders: ``os.PathLike`` values are stored as ``str`` (``to_dict`` is JSON)
PATH_OPTIONS = ("model", "dataset", "out", "cache_dir", "sae_text_files", "dictionaries")

#: before ``sae_seed`` existed the transcoders were trained with ``seed + 42`` (``from_saved`` keeps that for old
#: folders)
LEGACY_SAE_SEED_OFFSET = 42

#: options that were removed, and why: a config file that still sets one gets a message that says so
REMOVED = {"top_nodes": "the circuit size is set by node_threshold (circuit_search='eap') or refine_budget "
                        "('refine')",
           "extra": "nothing read it"}

#: ``quick``: options set to a fixed value, and options capped at a value (the other caps are the ``quick_*``
#: fields: ``max_facts <= quick_facts``, ``held_out_facts <= quick_held_out``; ``quick_relations`` selects the first
#: relations of the dataset when the run loads it, ``Run._load_dataset``)
QUICK_FIXED = {"patching_facts": 1, "graphs_per_relation": 1, "causal_facts": 1, "causal_full_facts": 0}
# a quick run still measures its transcoders (on 128 held-out tokens per layer): a feature circuit on dictionaries of
# unknown quality is never a finding
QUICK_CAPS = {"n_random": 100, "sae_training_tokens": 10_240, "feature_facts": 2, "feature_nodes": 64,
              "feature_context_tokens": 512, "sae_eval_tokens": 128}


@functools.cache
def choices() -> dict[str, tuple[str, ...]]:
    """Each option with a closed set of values -> its valid values, read from the code that consumes it."""
    from circuit_discovery.attribution.component_graph import GRANULARITIES, METHODS
    from circuit_discovery.metrics import METRICS
    from circuit_discovery.sae.training import ACTIVATION_PLACES
    from circuit_discovery.validation.ablation import ABLATIONS

    return {"metric": tuple(METRICS), "granularity": tuple(GRANULARITIES), "component_method": tuple(METHODS),
            "ablation": tuple(ABLATIONS), "circuit_search": CIRCUIT_SEARCHES,
            "sae_kind": SAE_KINDS, "sae_activations": ACTIVATION_PLACES}


@dataclass
class RunConfig:
    """The options of a run. Every entry point (``frc``, ``main.py``, :class:`~circuit_discovery.CircuitDiscovery`,
    ``run_pipeline``) builds one, and construction resolves and checks everything:

    * ``quick`` is applied here, once (:data:`QUICK_FIXED`, :data:`QUICK_CAPS`, ``quick_facts``,
      ``quick_held_out``), so every entry point sees the same values. It is idempotent: ``RunConfig(**c.to_dict())
      == c``. ``dataclasses.replace(c, quick=False)`` keeps the reduced values.
    * types, closed sets of values (:func:`choices`, :data:`BASELINES`, :data:`DEVICES`) and ranges
      (:data:`MINIMUMS`, :data:`RANGES`) are checked, so a typo fails at once with a :class:`ConfigError` that
      names the option, the value and the valid values, not minutes later in the stage that reads it.
    """

    model: str | None = None            # None: the built-in gemma-3-270m
    device: str = "auto"                # auto, cpu, mps, cuda or cuda:N (DEVICES)
    seed: int = 0
    quick: bool = False
    relations: list[str] | None = None  # None: every relation of the dataset
    dataset: str | None = None          # None: the built-in facts; else a JSON file (seed, rich or ROME format)
    out: str | None = None              # None: outputs/circuit_discovery_YYYYMMDD_HHMMSS
    known_k: int = 1                    # a fact is known when its first answer token ranks <= k
    max_facts: int = 12                 # discovery facts (subject-swap pairs) per relation
    held_out_facts: int = 8             # held-out facts per relation: split off before pairing (a share
                                        # held_out_facts / (max_facts + held_out_facts) of each pairable group),
                                        # used only to validate
    metric: str = "logit_diff"          # "logit_diff", "logprob" or "prob" (metrics.METRICS)
    batch_size: int = 32
    resume: bool = False
    cache_dir: str | None = None
    progress: bool = True
    quick_relations: int = 4            # with --quick: the first N relations...
    quick_facts: int = 6                # ...N discovery facts each...
    quick_held_out: int = 4             # ...and N held-out facts each
    patching_facts: int = 1             # prompts per relation for the exact resid_pre patching heatmap (0: all)
    granularity: str = "head"           # component circuits: attention heads ("head") or whole layers ("layer")
    component_method: str = "eap"       # edge scores: "eap" (one backward) or "eap-ig"
    circuit_search: str = "refine"      # "refine": grow the circuit from the EAP ranking by exact ablation on the
                                        # discovery facts; "eap": the influence-pruned graph (docs/circuit_search.md)
    refine_budget: float = 0.05         # "refine": at most this share of the non-inert discovery nodes
    ig_steps: int = 5                   # EAP-IG steps
    node_threshold: float = 0.8         # pruning: share of influence the kept nodes cover
    edge_threshold: float = 0.98        # pruning: share of influence the kept edges cover
    ablation: str = "corrupted"         # outside the circuit: "corrupted", "mean" or "zero" (feature circuits:
                                        # "corrupted" or "zero"; with "mean" they use "corrupted")
    n_random: int = 100                 # random circuits per baseline (smallest p = 1/101 < 0.01)
    baselines: list[str] = field(default_factory=lambda: ["matched", "top_m", "last_token"])  # held-out baselines of
                                        # component circuits; "component_role" adds random circuits matched on
                                        # (component, role) only (tests the choice of layers; 100 more evaluations)
    min_metric_gap: float = 0.5         # |m(N) - m(empty)| below this (logits): faithfulness is degenerate, not
                                        # reported
    graphs_per_relation: int = 2        # per-prompt Neuronpedia graphs exported per relation
    causal_facts: int = 2               # facts per relation traced ROME-style (MLP and attention, last subject token)
    causal_samples: int = 10            # noise samples per traced fact (ROME: 10)
    causal_full_facts: int = 2          # facts traced at every token and layer (states, MLP, attention) for the figure
    features: bool = True               # train (or reuse) transcoders and build feature circuits per relation
    dictionaries: str | None = None     # load transcoders instead of training them: a local folder/file or a
                                        # Hugging Face repo id/path in the local cache (sae.load_transcoder_set)
    sae_kind: str = "jumprelu_skip_transcoder"  # which transcoders to train (SAE_KINDS; docs/sae.md compares them)
    sae_activations: str = "disk"       # training activations on disk (memory-mapped store, same dictionaries) or in
                                        # "memory" (faster when RAM allows: rows x 2 hooks x layers x d_model x 4 B)
    sae_layers: list[int] | None = None  # transcoder layers (None: every layer; others become error nodes)
    sae_training_tokens: int = 100_000  # training tokens per transcoder (TopK, d_sae = 4 x d_model)
    sae_k: int = 64                     # active latents per token (TopK)
    sae_eval_tokens: int = 256          # held-out tokens per layer for the SAELens metrics (0: skip)
    sae_corpus_sequences: int | None = None  # model-sampled corpus sequences (None: the built-in 256; 2048 gives
                                             # ~130k tokens, about 20 min of sampling once; docs/sae.md)
    sae_text_files: list[str] = field(default_factory=list)  # extra UTF-8 text files for the transcoder corpus
    sae_seed: int = 42                  # seed of the transcoders' training, independent of ``seed``: changing the
                                        # run's seed reuses the cached transcoders (42: the former 0 + 42 of seed 0)
    feature_facts: int = 2              # discovery facts per relation for feature graphs
    feature_nodes: int = 128            # feature nodes per prompt graph (visited by estimated influence)
    steer_features: int = 10            # top features ablated (necessity) / subject features steered (sufficiency)
    steer_random: int = 10              # draws of random subject features steered as the sufficiency baseline
    feature_context_tokens: int = 1024  # held-out corpus tokens searched for each circuit feature's top contexts
    feature_max_edges: int = 1000       # strongest edges of a feature circuit kept in circuits.json (the count
                                        # after pruning goes to the circuit's n_edges_pruned_graph)

    def __post_init__(self):
        self._check_types()
        for name, least, why in MINIMUMS:
            v = getattr(self, name)
            if v < least:
                raise ConfigError(f"{name} must be an integer >= {least} ({why}), got {v!r}")
        for name, least, most, what in RANGES:
            v = getattr(self, name)
            if v is not None and ((least is not None and v < least) or (most is not None and v > most)):
                bounds = f"in [{least}, {most}]" if most is not None else f">= {least}"
                raise ConfigError(f"{name} must be {bounds} ({what}), got {v!r}")
        if not 0 < self.refine_budget <= 1:
            raise ConfigError(f"refine_budget must be in (0, 1] (a share of the non-inert nodes), "
                              f"got {self.refine_budget!r}")
        for name, valid in choices().items():
            v = getattr(self, name)
            if v not in valid:
                raise ConfigError(f"{name}={v!r} is not valid; use one of: {', '.join(valid)}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad or len(set(self.baselines)) != len(self.baselines):
            raise ConfigError(f"baselines={self.baselines!r} is not valid; give a list of distinct entries of: "
                              f"{', '.join(BASELINES)}")
        if not _DEVICE_RE.fullmatch(self.device):
            raise ConfigError(f"device={self.device!r} is not valid; use one of: {', '.join(DEVICES)}")
        if self.sae_layers is not None and (not self.sae_layers or min(self.sae_layers) < 0):
            raise ConfigError(f"sae_layers={self.sae_layers!r} is not valid; give layer indices >= 0, or leave it "
                              "out for every layer")
        missing = [f for f in self.sae_text_files if not Path(f).is_file()]
        if missing:
            raise ConfigError(f"sae_text_files: {', '.join(missing)} not found; give existing UTF-8 text files")
        if self.ablation not in _feature_ablations() and self.features:
            log.warning("ablation=%r applies to component circuits only; feature circuits ablate with 'corrupted' "
                        "(they support %s)", self.ablation, ", ".join(_feature_ablations()))
        if self.quick:
            self._apply_quick()

    def _check_types(self) -> None:
        """Check every option against its annotation; store paths as ``str``, integers as ``int``, lists as
        ``list``."""
        for f in dataclasses.fields(self):
            hint, v = _hints()[f.name], getattr(self, f.name)
            if f.name in PATH_OPTIONS:
                v = [os.fspath(x) if isinstance(x, os.PathLike) else x for x in v] if isinstance(v, (list, tuple)) \
                    else os.fspath(v) if isinstance(v, os.PathLike) else v
            if not _type_ok(v, hint):
                valid = {**choices(), "baselines": BASELINES, "device": DEVICES}.get(f.name)
                raise ConfigError(f"{f.name}={v!r} is not valid; give {_describe(hint)}"
                                  + (f" of: {', '.join(valid)}" if valid else ""))
            setattr(self, f.name, _normalised(v))

    def _apply_quick(self) -> None:
        self.max_facts = min(self.max_facts, self.quick_facts)
        self.held_out_facts = min(self.held_out_facts, self.quick_held_out)
        for name, value in QUICK_FIXED.items():
            setattr(self, name, value)
        for name, cap in QUICK_CAPS.items():
            setattr(self, name, min(getattr(self, name), cap))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, data: dict, **overrides) -> RunConfig:
        """A configuration saved by :meth:`to_dict` (``stages/run_config.json``), also by an older version: removed
        options are dropped, and a folder saved before ``sae_seed`` existed keeps its transcoders (``seed + 42``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        seed = data.get("seed", cls.seed)
        if "sae_seed" not in data and isinstance(seed, int):
            data["sae_seed"] = seed + LEGACY_SAE_SEED_OFFSET
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> RunConfig:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; check the path") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML ({e}); fix it") from None
        data = data.get("run", data)
        known = {f.name for f in dataclasses.fields(cls)}
        removed = sorted(set(data) & set(REMOVED))
        if removed:
            raise ConfigError(f"option(s) {', '.join(removed)} in {path} were removed "
                              f"({'; '.join(f'{k}: {REMOVED[k]}' for k in removed)}); delete them from the file")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)} in {path}; valid: {', '.join(sorted(known))}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)


@functools.cache
def _hints() -> dict[str, typing.Any]:
    return typing.get_type_hints(RunConfig)


@functools.cache
def _feature_ablations() -> tuple[str, ...]:
    from circuit_discovery.validation.features import FEATURE_ABLATIONS

    return tuple(FEATURE_ABLATIONS)


def _type_ok(v, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_type_ok(v, a) for a in typing.get_args(hint))
    if hint is type(None):
        return v is None
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if hint is float:
        return isinstance(v, numbers.Real) and not isinstance(v, bool)
    if hint is str:
        return isinstance(v, str)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(v, (list, tuple)) and all(_type_ok(x, item) for x in v)
    return True


def _describe(hint) -> str:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_describe(a) for a in args) + " (or leave it out)"
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    names = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, str(hint))


def _normalised(v):
    """Integers as ``int`` (NumPy integers are not JSON), sequences as ``list``."""
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, tuple):
        v = list(v)
    if isinstance(v, list):
        return [_normalised(x) for x in v]
    return v
