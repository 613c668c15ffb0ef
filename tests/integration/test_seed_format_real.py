"""A seed-format file without subjects gives the circuits of the same facts in the rich format, on Gemma 3 270M.

One relation with lowercase subjects that are not first in the sentence, six facts, quick settings, no
feature circuits; only the stages a circuit needs (known filter, circuits).
"""
import json

import pytest

from ..unit.test_seed_format import seed_and_rich

pytestmark = pytest.mark.integration

ELEMENTS = [("hydrogen", "H", "O"), ("oxygen", "O", "H"), ("carbon", "C", "N"), ("nitrogen", "N", "C"),
            ("helium", "He", "Li"), ("sodium", "Na", "K")]
TEMPLATE = "The chemical symbol for {} is"


@pytest.mark.timeout(1800)
def test_seed_run_matches_rich_run_on_real_model(tmp_path):
    from circuit_discovery.facts import check_subject_tokens, load_dataset
    from circuit_discovery.models import load_model
    from circuit_discovery.pipeline import RunConfig, run_pipeline

    seed_path, rich_path = seed_and_rich(tmp_path, ELEMENTS, TEMPLATE, "element_symbol")
    seed, rich = load_dataset(seed_path), load_dataset(rich_path)
    assert [f.subject for f in seed["element_symbol"]] == [s for s, _, _ in ELEMENTS]
    assert seed["element_symbol"] == rich["element_symbol"]
    assert seed.template_lines() == ["element_symbol: The chemical symbol for {subject} is  (aligned, 6 facts)"]
    check_subject_tokens(seed, load_model(device="cpu").tokenizer)
    nodes = []
    for name, path in (("seed", seed_path), ("rich", rich_path)):
        res = run_pipeline(RunConfig(dataset=str(path), out=str(tmp_path / name), device="cpu", known_k=10**6,
                                     quick=True, quick_facts=4, quick_held_out=2, features=False, n_random=19,
                                     baselines=["matched"], progress=False), only=["known", "circuits"])
        circuits = json.loads((res.out_dir / "stages" / "circuits.json").read_text())["relations"]
        assert list(circuits) == ["element_symbol"]
        nodes.append([n["id"] for n in circuits["element_symbol"]["circuit"]["nodes"]])
    assert nodes[0] and nodes[0] == nodes[1]
