"""RunConfig: one source of truth. ``quick`` is resolved at construction (idempotently), and every option is checked
when the configuration is built, with a one-line ConfigError that names the option, the value and the valid values."""
import dataclasses
import logging

import numpy as np
import pytest

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.pipeline.config import (BASELINES, DEVICES, MINIMUMS, QUICK_CAPS, QUICK_FIXED, RANGES, REMOVED,
                                               ConfigError, RunConfig, _hints, choices)

FIELDS = [f.name for f in dataclasses.fields(RunConfig)]

#: the defaults of a run: a default run's outputs depend on them, so a change must be deliberate (edit here too)
DEFAULTS = dict(
    model=None, device="auto", seed=0, quick=False, relations=None, dataset=None, out=None, known_k=1, max_facts=12,
    held_out_facts=8, metric="logit_diff", batch_size=32, resume=False, cache_dir=None, progress=True,
    quick_relations=4, quick_facts=6, quick_held_out=4, patching_facts=1, granularity="head", component_method="eap",
    circuit_search="refine", refine_budget=0.05, ig_steps=5, node_threshold=0.8, edge_threshold=0.98,
    ablation="corrupted", n_random=100, baselines=["matched", "top_m", "last_token"], min_metric_gap=0.5,
    graphs_per_relation=2, causal_facts=2, causal_samples=10, causal_full_facts=2, features=True, dictionaries=None,
    sae_kind="jumprelu_skip_transcoder", sae_activations="disk", sae_layers=None,
    sae_training_tokens=100_000, sae_k=64, sae_eval_tokens=256, sae_corpus_sequences=None, sae_text_files=[],
    sae_seed=42, feature_facts=2, feature_nodes=128, steer_features=10, steer_random=10, feature_context_tokens=1024,
    feature_max_edges=1000)


def one_line(err: pytest.ExceptionInfo, *needles) -> str:
    msg = str(err.value)
    assert isinstance(err.value, ConfigError) and isinstance(err.value, CircuitDiscoveryError)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


def test_defaults_are_unchanged():
    assert RunConfig().to_dict() == DEFAULTS
    assert "top_nodes" not in FIELDS and "extra" not in FIELDS


# ------------------------------------------------------------------------------------------------------- quick
def test_quick_is_resolved_at_construction():
    q = RunConfig(quick=True)
    assert (q.max_facts, q.held_out_facts) == (q.quick_facts, q.quick_held_out) == (6, 4)
    for name, value in QUICK_FIXED.items():
        assert getattr(q, name) == value, name
    for name, cap in QUICK_CAPS.items():
        assert getattr(q, name) == min(DEFAULTS[name], cap), name
    # the values the former RunConfig.effective() gave (except sae_eval_tokens, 0 then: quick runs now measure
    # their transcoders)
    assert (q.n_random, q.graphs_per_relation, q.causal_facts, q.causal_samples, q.causal_full_facts,
            q.sae_training_tokens, q.sae_eval_tokens, q.feature_facts, q.feature_nodes, q.feature_context_tokens,
            q.patching_facts) == (100, 1, 1, 10, 0, 10_240, 128, 2, 64, 512, 1)
    # caps only lower
    small = RunConfig(quick=True, max_facts=4, held_out_facts=2, sae_training_tokens=100, feature_nodes=8)
    assert (small.max_facts, small.held_out_facts, small.sae_training_tokens, small.feature_nodes) == (4, 2, 100, 8)


@pytest.mark.parametrize("kw", [{}, {"quick": True}, {"quick": True, "quick_facts": 4, "quick_held_out": 3},
                                {"quick": True, "max_facts": 5, "n_random": 500, "sae_layers": [1, 2]},
                                {"metric": "prob", "baselines": list(BASELINES), "sae_seed": 7}])
def test_construction_is_idempotent(kw):
    c = RunConfig(**kw)
    assert RunConfig(**c.to_dict()) == c
    assert RunConfig.from_saved(c.to_dict()) == c


def test_every_entry_point_sees_the_same_quick_values(tmp_path):
    from circuit_discovery import CircuitDiscovery

    direct = RunConfig(quick=True, model="tiny-gemma3")
    toml = tmp_path / "c.toml"
    toml.write_text('[run]\nquick = true\nmodel = "tiny-gemma3"\n')
    assert RunConfig.from_toml(toml) == direct
    api = CircuitDiscovery(model_name="tiny-gemma3", quick=True).cfg  # lazy: no model is loaded
    assert api == direct and api.max_facts == 6


# -------------------------------------------------------------------------------------------- closed sets of values
@pytest.mark.parametrize("name", sorted(choices()))
def test_closed_sets_are_checked(name):
    valid = choices()[name]
    assert DEFAULTS[name] in valid
    for v in valid:
        assert getattr(RunConfig(**{name: v}), name) == v
    with pytest.raises(ConfigError) as err:
        RunConfig(**{name: "no-such-value"})
    one_line(err, name, "'no-such-value'", *valid)


def test_closed_sets_come_from_their_consumers():
    from circuit_discovery.attribution.component_graph import GRANULARITIES, METHODS
    from circuit_discovery.metrics import METRICS
    from circuit_discovery.validation.ablation import ABLATIONS

    c = choices()
    assert (c["metric"], c["granularity"], c["component_method"], c["ablation"]) == (
        tuple(METRICS), tuple(GRANULARITIES), tuple(METHODS), tuple(ABLATIONS))
    assert set(c["circuit_search"]) == {"eap", "refine"}
    from circuit_discovery.sae.dictionaries import SAE_KINDS
    from circuit_discovery.sae.training import ACTIVATION_PLACES

    assert (c["sae_kind"], c["sae_activations"]) == (SAE_KINDS, ACTIVATION_PLACES)


@pytest.mark.parametrize("bad", [["matched", "nope"], "matched", ["matched", "matched"], [1]])
def test_baselines_are_checked(bad):
    with pytest.raises(ConfigError) as err:
        RunConfig(baselines=bad)
    one_line(err, "baselines", *BASELINES)


def test_every_baseline_is_accepted():
    assert RunConfig(baselines=list(BASELINES)).baselines == list(BASELINES)
    assert RunConfig(baselines=[]).baselines == []


@pytest.mark.parametrize("device", ["auto", "cpu", "mps", "cuda", "cuda:0", "cuda:12"])
def test_device_strings_accepted(device):
    assert RunConfig(device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", "", "cuda:0 "])
def test_bad_device_strings_fail_at_construction(device):
    with pytest.raises(ConfigError) as err:
        RunConfig(device=device)
    one_line(err, "device", repr(device), *DEVICES)


def test_sae_layers_are_checked():
    assert RunConfig(sae_layers=[0, 3]).sae_layers == [0, 3]
    for bad in ([], [-1], ["1"], 3):
        with pytest.raises(ConfigError) as err:
            RunConfig(sae_layers=bad)
        one_line(err, "sae_layers")


def test_mean_ablation_warns_that_feature_circuits_use_corrupted(caplog):
    with caplog.at_level(logging.WARNING, logger="circuit_discovery.pipeline.config"):
        RunConfig(ablation="mean")
    assert "feature circuits" in caplog.text and "'corrupted'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="circuit_discovery.pipeline.config"):
        RunConfig(ablation="mean", features=False)
        RunConfig(ablation="zero")
    assert caplog.text == ""


# ------------------------------------------------------------------------------------------------------ ranges
BOUNDS = [(name, least, None) for name, least, _ in MINIMUMS] + [(name, lo, hi) for name, lo, hi, _ in RANGES]


@pytest.mark.parametrize("name, least, most", BOUNDS, ids=[b[0] for b in BOUNDS])
def test_ranges(name, least, most):
    assert name in FIELDS
    assert RunConfig(**{name: least}).to_dict()[name] == least
    below = least - 1 if isinstance(least, int) else least - 0.5
    with pytest.raises(ConfigError) as err:
        RunConfig(**{name: below})
    one_line(err, name, repr(below), least)
    if most is not None:
        assert getattr(RunConfig(**{name: most}), name) == most
        with pytest.raises(ConfigError) as err:
            RunConfig(**{name: most + 0.5})
        one_line(err, name, most)


def test_every_numeric_option_has_a_range():
    """A new numeric option gets a range in MINIMUMS or RANGES (or is listed here with why it has none)."""
    no_range = {"refine_budget"}  # (0, 1], checked on its own (an open lower bound)
    numeric = {n for n in FIELDS if {int, float} & set(getattr(_hints()[n], "__args__", (_hints()[n],)))}
    assert numeric - {b[0] for b in BOUNDS} == no_range


@pytest.mark.parametrize("budget", [0, -0.1, 1.5])
def test_refine_budget_range(budget):
    with pytest.raises(ConfigError) as err:
        RunConfig(refine_budget=budget)
    one_line(err, "refine_budget", repr(budget), "(0, 1]")
    assert RunConfig(refine_budget=1).refine_budget == 1


# ------------------------------------------------------------------------------------------------------- types
def _wrong_value(name):
    hint = _hints()[name]
    if getattr(hint, "__origin__", None) is list or list in [getattr(a, "__origin__", None)
                                                             for a in getattr(hint, "__args__", ())]:
        return "not-a-list" if name not in ("sae_text_files",) else 3
    args = set(getattr(hint, "__args__", (hint,)))
    if bool in args:
        return "yes"
    if int in args or float in args:
        return "12"
    return 3  # a string option


@pytest.mark.parametrize("name", FIELDS)
def test_every_option_checks_its_type(name):
    bad = _wrong_value(name)
    with pytest.raises(ConfigError) as err:
        RunConfig(**{name: bad})
    one_line(err, name, repr(bad))


def test_integers_are_not_booleans_or_floats():
    for bad in (True, 12.0):
        with pytest.raises(ConfigError, match="max_facts"):
            RunConfig(max_facts=bad)
    assert RunConfig(node_threshold=1).node_threshold == 1  # an integer is a number


def test_paths_and_numpy_integers_are_stored_as_json_types(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("x", encoding="utf-8")
    c = RunConfig(out=tmp_path / "o", cache_dir=tmp_path, dataset=tmp_path / "d.json", sae_text_files=[text],
                  seed=np.int64(3), sae_layers=(np.int32(1), 2), relations=("capital_city",))
    assert c.out == str(tmp_path / "o") and c.cache_dir == str(tmp_path) and c.sae_text_files == [str(text)]
    assert type(c.seed) is int and c.sae_layers == [1, 2] and all(type(x) is int for x in c.sae_layers)
    assert c.relations == ["capital_city"]
    import json

    json.dumps(c.to_dict())


# ---------------------------------------------------------------------------------- removed options, saved configs
@pytest.mark.parametrize("name", sorted(REMOVED))
def test_removed_options_say_so(tmp_path, name):
    toml = tmp_path / "c.toml"
    toml.write_text(f"[run]\n{name} = 12\n" if name == "top_nodes" else f"[run]\n[run.{name}]\na = 1\n")
    with pytest.raises(ConfigError) as err:
        RunConfig.from_toml(toml)
    one_line(err, name, "removed", "delete")
    with pytest.raises(TypeError):
        RunConfig(**{name: 1})


def test_from_toml_unknown_option_lists_the_valid_ones(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[run]\nsae_sed = 1\n")
    with pytest.raises(ConfigError) as err:
        RunConfig.from_toml(toml)
    one_line(err, "sae_sed", "sae_seed")


def test_from_toml_overrides_only_given_values(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[run]\nseed = 7\ndevice = 'cpu'\nsae_seed = 5\n")
    assert (RunConfig.from_toml(toml, seed=None, device=None).seed, RunConfig.from_toml(toml).device) == (7, "cpu")
    c = RunConfig.from_toml(toml, seed=9)
    assert (c.seed, c.device, c.sae_seed) == (9, "cpu", 5)


def test_from_saved_reads_older_folders():
    """An old stages/run_config.json: removed options are dropped; without sae_seed the transcoders keep the seed
    they were trained with (seed + 42)."""
    old = {**DEFAULTS, "top_nodes": 12, "extra": {}, "seed": 7}
    del old["sae_seed"]
    c = RunConfig.from_saved(old)
    assert c.seed == 7 and c.sae_seed == 49
    assert RunConfig.from_saved({**old, "sae_seed": 42}).sae_seed == 42
    assert RunConfig.from_saved(old, seed=1, device=None).seed == 1


def test_sae_seed_is_independent_of_the_run_seed():
    assert RunConfig(seed=1).sae_seed == RunConfig().sae_seed == 42
    assert RunConfig(sae_seed=0).seed == 0


def test_text_file_options_are_checked(tmp_path):
    with pytest.raises(ConfigError) as err:
        RunConfig(sae_text_files=[str(tmp_path / "missing.txt")])
    one_line(err, "missing.txt")
