"""Run configuration: one dataclass with defaults that work, loadable from TOML and overridable from the CLI."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CircuitDiscoveryError


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
)


#: held-out baselines a run can compute (``RunConfig.baselines``)
BASELINES = ("matched", "component_role", "top_m", "last_token")


@dataclass
class RunConfig:
    model: str | None = None            # None: the built-in gemma-3-270m
    device: str = "auto"
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
    metric: str = "logit_diff"
    top_nodes: int = 12                 # nodes kept in a relation's first circuit
    batch_size: int = 32
    resume: bool = False
    cache_dir: str | None = None
    progress: bool = True
    quick_relations: int = 4            # with --quick: the first N relations...
    quick_facts: int = 6                # ...N discovery facts each...
    quick_held_out: int = 4             # ...and N held-out facts each
    patching_facts: int = 1             # prompts per relation for the exact resid_pre patching heatmap
    granularity: str = "head"           # component circuits: attention heads ("head") or whole layers ("layer")
    component_method: str = "eap"       # edge scores: "eap" (one backward) or "eap-ig"
    circuit_search: str = "refine"      # "refine": grow the circuit from the EAP ranking by exact ablation on the
                                        # discovery facts; "eap": the influence-pruned graph (docs/circuit_search.md)
    refine_budget: float = 0.05         # "refine": at most this share of the non-inert discovery nodes
    ig_steps: int = 5                   # EAP-IG steps
    node_threshold: float = 0.8         # pruning: share of influence the kept nodes cover
    edge_threshold: float = 0.98        # pruning: share of influence the kept edges cover
    ablation: str = "corrupted"         # outside the circuit: "corrupted", "mean" or "zero"
    n_random: int = 100                 # random circuits per baseline (smallest p = 1/101 < 0.01)
    baselines: list[str] = field(default_factory=lambda: ["matched", "top_m", "last_token"])  # held-out baselines of
                                        # component circuits; "component_role" adds random circuits matched on
                                        # (component, role) only (tests the choice of layers; 100 more evaluations)
    min_metric_gap: float = 0.5         # |m(N) - m(empty)| below this (logits): faithfulness is degenerate, not reported
    graphs_per_relation: int = 2        # per-prompt Neuronpedia graphs exported per relation
    causal_facts: int = 2               # facts per relation traced ROME-style (MLP and attention, last subject token)
    causal_samples: int = 10            # noise samples per traced fact (ROME: 10)
    causal_full_facts: int = 2          # facts traced at every token and layer (states, MLP, attention) for the figure
    features: bool = True               # train (or reuse) transcoders and build feature circuits per relation
    sae_layers: list[int] | None = None  # transcoder layers (None: every layer; others become error nodes)
    sae_training_tokens: int = 100_000  # training tokens per transcoder (TopK, d_sae = 4 x d_model)
    sae_k: int = 64                     # active latents per token (TopK)
    sae_eval_tokens: int = 256          # held-out tokens per layer for the SAELens metrics (0: skip)
    sae_corpus_sequences: int | None = None  # model-sampled corpus sequences (None: the built-in 256; 2048 gives
                                             # ~130k tokens, about 20 min of sampling once; docs/sae.md)
    sae_text_files: list[str] = field(default_factory=list)  # extra UTF-8 text files for the transcoder corpus
    feature_facts: int = 2              # discovery facts per relation for feature graphs
    feature_nodes: int = 128            # feature nodes per prompt graph (visited by estimated influence)
    steer_features: int = 10            # top features ablated (necessity) / subject features steered (sufficiency)
    steer_random: int = 10              # draws of random subject features steered as the sufficiency baseline
    feature_context_tokens: int = 1024  # held-out corpus tokens searched for each circuit feature's top contexts
    feature_max_edges: int = 1000       # strongest edges of a feature circuit kept in circuits.json (the count
                                        # after pruning goes to the circuit's n_edges_pruned_graph)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, least, why in MINIMUMS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ConfigError(f"{name} must be an integer >= {least} ({why}), got {v!r}")
        n = self.sae_corpus_sequences
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
            raise ConfigError(f"sae_corpus_sequences must be a positive integer or left out, got {n!r}")
        if self.circuit_search not in ("eap", "refine"):
            raise ConfigError(f"circuit_search must be 'eap' or 'refine', got {self.circuit_search!r}")
        if not 0 < float(self.refine_budget) <= 1:
            raise ConfigError(f"refine_budget must be in (0, 1], got {self.refine_budget!r}")
        bad = sorted(set(self.baselines) - set(BASELINES))
        if isinstance(self.baselines, str) or bad:
            raise ConfigError(f"baselines must be a list of {', '.join(BASELINES)}; got {self.baselines!r}")
        files = self.sae_text_files
        if isinstance(files, str) or not all(isinstance(f, str) for f in files):
            raise ConfigError(f"sae_text_files must be a list of file paths, got {files!r}")
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise ConfigError(f"sae_text_files: {', '.join(missing)} not found; give existing UTF-8 text files")

    def effective(self) -> "RunConfig":
        """The configuration after applying ``quick``."""
        if not self.quick:
            return self
        return dataclasses.replace(self, max_facts=min(self.max_facts, self.quick_facts),
                                   held_out_facts=min(self.held_out_facts, self.quick_held_out), patching_facts=1,
                                   n_random=min(self.n_random, 100), graphs_per_relation=1, causal_facts=1,
                                   causal_samples=self.causal_samples,
                                   causal_full_facts=0, sae_training_tokens=min(self.sae_training_tokens, 10_240),
                                   sae_eval_tokens=0, feature_facts=min(self.feature_facts, 2),
                                   feature_nodes=min(self.feature_nodes, 64),
                                   feature_context_tokens=min(self.feature_context_tokens, 512))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "RunConfig":
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; check the path") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML ({e}); fix it") from None
        data = data.get("run", data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)} in {path}; valid: {', '.join(sorted(known))}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)
