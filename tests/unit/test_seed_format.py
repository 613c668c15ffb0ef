"""Seed-format subjects and templates inferred by aligning a relation's entries (no capital-letter guessing)."""
import pytest

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.facts import (
    DatasetError,
    check_subject_tokens,
    load_rich,
    load_seed,
)


def _entries(prompt_answers, wrong=" Nothing"):
    return [{"clean": f"{p} {a}", "corrupted": f"{p}{wrong}"} for p, a in prompt_answers]


def _subjects(ds, rel):
    return [f.subject for f in ds[rel]]


def _templates(ds, rel):
    return [(t.template, t.source) for t in ds.templates[rel]]


def _error(obj, match):
    with pytest.raises(DatasetError, match=match) as info:
        load_seed(obj)
    assert isinstance(info.value, CircuitDiscoveryError) and "\n" not in str(info.value)
    return str(info.value)


def test_subject_in_the_middle_not_first_capital():
    ds = load_seed({"language": _entries([("Most people in Brazil speak", "Portuguese"),
                                          ("Most people in Japan speak", "Japanese"),
                                          ("Most people in South Korea speak", "Korean")])})
    assert _subjects(ds, "language") == ["Brazil", "Japan", "South Korea"]
    assert _templates(ds, "language") == [("Most people in {} speak", "aligned")]
    f = ds["language"][2]
    assert (f.prompt, f.answer, f.counterfactual, f.template) == (
        "Most people in South Korea speak", " Korean", " Nothing", "Most people in {} speak")
    assert ds.relations["language"].template == "Most people in {} speak"
    assert ds.template_lines() == ["language: Most people in {subject} speak  (aligned, 3 facts)"]


def test_lowercase_subjects():
    ds = load_seed({"element_symbol": _entries([("The symbol of the element iron is", "Fe"),
                                                ("The symbol of the element gold is", "Au"),
                                                ("The symbol of the element silver is", "Ag")])})
    assert _subjects(ds, "element_symbol") == ["iron", "gold", "silver"]
    assert _templates(ds, "element_symbol") == [("The symbol of the element {} is", "aligned")]


def test_subject_at_the_start_multiword():
    ds = load_seed({"landmark": _entries([("The Eiffel Tower is located in", "Paris"),
                                          ("The Leaning Tower of Pisa is located in", "Pisa"),
                                          ("Big Ben is located in", "London")])})
    assert _subjects(ds, "landmark") == ["The Eiffel Tower", "The Leaning Tower of Pisa", "Big Ben"]
    assert _templates(ds, "landmark") == [("{} is located in", "aligned")]


def test_subject_at_the_end_of_the_prompt_with_punctuation():
    ds = load_seed({"currency": _entries([("Currency used in Japan:", "yen"),
                                          ("Currency used in the United Kingdom:", "pound"),
                                          ("Currency used in India:", "rupee")])})
    assert _subjects(ds, "currency") == ["Japan", "the United Kingdom", "India"]
    assert _templates(ds, "currency") == [("Currency used in {}:", "aligned")]
    ds = load_seed({"capital": _entries([("The country whose capital is Paris is", "France"),
                                         ("The country whose capital is Tokyo is", "Japan")])})
    assert _subjects(ds, "capital") == ["Paris", "Tokyo"]
    ds = load_seed({"possessive": _entries([("France's capital is", "Paris"), ("Japan's capital is", "Tokyo")])})
    assert _subjects(ds, "possessive") == ["France", "Japan"]
    assert _templates(ds, "possessive") == [("{}'s capital is", "aligned")]


def test_subjects_sharing_words_stay_whole():
    ds = load_seed({"city": _entries([("New York is a city in", "USA"), ("New Delhi is a city in", "India"),
                                      ("San Diego is a city in", "USA"), ("San Jose is a city in", "USA")])})
    assert _subjects(ds, "city") == ["New York", "New Delhi", "San Diego", "San Jose"]
    assert _templates(ds, "city") == [("{} is a city in", "aligned")]


def test_relation_with_two_sentence_shapes():
    ds = load_seed({"language": _entries([("Most people in Brazil speak", "Portuguese"),
                                          ("The official language of France is", "French"),
                                          ("Most people in Japan speak", "Japanese"),
                                          ("The official language of Germany is", "German"),
                                          ("The official language of Italy is", "Italian")])})
    assert _subjects(ds, "language") == ["Brazil", "France", "Japan", "Germany", "Italy"]
    assert _templates(ds, "language") == [("Most people in {} speak", "aligned"),
                                          ("The official language of {} is", "aligned")]
    assert ds.relations["language"].template is None
    assert ds.template_lines() == ["language: Most people in {subject} speak  (aligned, 2 facts)",
                                   "language: The official language of {subject} is  (aligned, 3 facts)"]


def test_shapes_sharing_edge_words_are_not_merged():
    ds = load_seed({"city": _entries([("The capital of France is", "Paris"), ("The capital of Spain is", "Madrid"),
                                      ("The largest city of Japan is", "Tokyo"),
                                      ("The largest city of Turkey is", "Istanbul")])})
    assert _subjects(ds, "city") == ["France", "Spain", "Japan", "Turkey"]
    assert _templates(ds, "city") == [("The capital of {} is", "aligned"), ("The largest city of {} is", "aligned")]


def test_shape_of_a_single_entry_is_an_error_not_a_guess():
    msg = _error({"city": _entries([("The capital of France is", "Paris"), ("The capital of Spain is", "Madrid"),
                                    ("The largest city of Japan is", "Tokyo")])},
                 match=r"relation 'city': entry 2 .*shares no sentence template")
    assert msg.endswith("add a 'subject' field to each entry of relation 'city'")


def test_single_entry_relation_uses_the_capital_letter_heuristic():
    ds = load_seed({"tower": [{"clean": "The Eiffel Tower is located in Paris",
                               "corrupted": "The Eiffel Tower is located in London"}]})
    assert _subjects(ds, "tower") == ["The Eiffel Tower"]
    assert _templates(ds, "tower") == [("{} is located in", "single-entry heuristic")]
    _error({"sym": [{"clean": "The symbol of the element iron is Fe", "corrupted": "The symbol of the element iron is Au"}]},
           match=r"relation 'sym': cannot find the subject of its only entry .*add a 'subject' field")


def test_same_subject_for_every_entry_is_an_error():
    msg = _error({"paris": [{"clean": "The capital of France is Paris", "corrupted": "The capital of France is Rome"},
                            {"clean": "The capital of France is Paris", "corrupted": "The capital of France is Lyon"}]},
                 match="the subject is the same for every entry")
    assert msg.endswith("add a 'subject' field to each entry of relation 'paris'")


def test_cannot_determine_is_an_error():
    # no shared template words at all: nothing says where the subject is
    _error({"mixed": _entries([("Brazil speaks", "Portuguese"), ("In Japan they use the", "yen")])},
           match=r"relation 'mixed': entry 0 .*shares no sentence template.*add a 'subject' field")
    # one prompt is the other plus a word: the shorter one would have no subject left
    _error({"r": _entries([("The capital of", "France"), ("The capital of the", "UK")])},
           match="shares no sentence template")


def test_explicit_subject_takes_precedence_and_its_template_is_reused():
    ds = load_seed({"currency": [
        {"clean": "The currency of the United States is the dollar",
         "corrupted": "The currency of the United States is the euro", "subject": "the United States"},
        {"clean": "The currency of the United Kingdom is the pound",
         "corrupted": "The currency of the United Kingdom is the euro"}]})
    # aligning the two alone would give "States" / "Kingdom"
    assert _subjects(ds, "currency") == ["the United States", "the United Kingdom"]
    assert _templates(ds, "currency") == [("The currency of {} is the", "explicit")]
    ds = load_seed({"r": [
        {"clean": "Most people in Brazil speak Portuguese", "corrupted": "Most people in Brazil speak Spanish",
         "subject": "people in Brazil"},
        {"clean": "Most people in Japan speak Japanese", "corrupted": "Most people in Japan speak Korean"},
        {"clean": "Most people in Peru speak Spanish", "corrupted": "Most people in Peru speak French"}]})
    assert _subjects(ds, "r") == ["people in Brazil", "people in Japan", "people in Peru"]
    assert _templates(ds, "r") == [("Most {} speak", "explicit")]
    _error({"r": [{"clean": "Most people in Brazil speak Portuguese", "corrupted": "Most people in Brazil speak X",
                   "subject": "Chile"}]}, match="subject 'Chile' does not occur in the prompt")


def test_corrupted_with_another_subject_is_aligned_with_the_clean_prompt():
    ds = load_seed({"location": [
        {"clean": "The Eiffel Tower is located in Paris", "corrupted": "The Colosseum is located in Rome"},
        {"clean": "Big Ben is located in London", "corrupted": "the Brandenburg Gate is located in Berlin"}]})
    assert _subjects(ds, "location") == ["The Eiffel Tower", "Big Ben"]
    assert [(f.prompt, f.answer, f.counterfactual) for f in ds["location"]] == [
        ("The Eiffel Tower is located in", " Paris", " Rome"), ("Big Ben is located in", " London", " Berlin")]
    assert _templates(ds, "location") == [("{} is located in", "aligned with corrupted")]
    one = load_seed({"language": [{"clean": "Most people in brazil speak Portuguese",
                                   "corrupted": "Most people in japan speak Japanese"}]})
    f = one["language"][0]
    assert (f.subject, f.template, f.answer, f.counterfactual) == (
        "brazil", "Most people in {} speak", " Portuguese", " Japanese")


def test_no_subject_is_taken_from_capital_letters_when_aligning():
    ds = load_seed({"language": _entries([("Most people in brazil speak", "Portuguese"),
                                          ("Most people in japan speak", "Japanese")])})
    assert _subjects(ds, "language") == ["brazil", "japan"]


def test_seed_facts_equal_rich_facts_with_explicit_subjects():
    seed = load_seed({"language": [
        {"clean": "Most people in Brazil speak Portuguese", "corrupted": "Most people in Brazil speak Japanese"},
        {"clean": "Most people in Japan speak Japanese", "corrupted": "Most people in Japan speak Portuguese"}]})
    rich = load_rich({"relations": [{"name": "language", "template": "Most people in {} speak", "facts": [
        {"subject": "Brazil", "answer": "Portuguese", "counterfactual": "Japanese"},
        {"subject": "Japan", "answer": "Japanese", "counterfactual": "Portuguese"}]}]})
    assert seed["language"] == rich["language"]
    assert rich.template_lines() == ["language: Most people in {subject} speak  (given, 2 facts)"]


def test_templates_survive_filtering_and_selection():
    ds = load_seed({"a": _entries([("Most people in Brazil speak", "P"), ("Most people in Japan speak", "J")]),
                    "b": _entries([("The symbol of the element iron is", "Fe"),
                                   ("The symbol of the element gold is", "Au")])})
    kept = ds.filter(lambda f: f.subject != "Japan").select("a")
    assert kept.template_lines() == ["a: Most people in {subject} speak  (aligned, 1 fact)"]


def test_check_subject_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "Most people in Brazil speak Japan".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    ok = load_seed({"a": _entries([("Most people in Brazil speak", "P"), ("Most people in Japan speak", "J")])})
    check_subject_tokens(ok, hf)
    bad = load_rich([{"relation": "a", "subject": "Bra", "prompt": "Most people in Brazil speak", "answer": "P"}])
    with pytest.raises(DatasetError, match="does not start and end on token boundaries"):
        check_subject_tokens(bad, hf)


# ----------------------------------------------------------------------------------------- acceptance

LANGUAGE = [("France", "French", "German"), ("Germany", "German", "French"), ("Italy", "Italian", "Spanish"),
            ("Spain", "Spanish", "Italian"), ("Japan", "Japanese", "Chinese"), ("China", "Chinese", "Japanese"),
            ("Russia", "Russian", "Polish"), ("Poland", "Polish", "Russian")]
TEMPLATE = "Most people in {} speak"


def seed_and_rich(tmp_path, facts=LANGUAGE, template=TEMPLATE, relation="language"):
    """The same facts as a seed file (no subjects) and as a rich file with explicit subjects."""
    import json

    seed = {relation: [{"clean": f"{template.format(s)} {a}", "corrupted": f"{template.format(s)} {c}"}
                       for s, a, c in facts]}
    rich = {"relations": [{"name": relation, "template": template, "facts": [
        {"subject": s, "answer": a, "counterfactual": c} for s, a, c in facts]}]}
    paths = tmp_path / "seed.json", tmp_path / "rich.json"
    for path, obj in zip(paths, (seed, rich)):
        path.write_text(json.dumps(obj), encoding="utf-8")
    return paths


def test_seed_run_gives_the_circuits_of_the_rich_run(tmp_path):
    """Acceptance: subjects not first in the sentence; seed and rich files give identical facts and circuits."""
    import json

    from circuit_discovery.facts import load_dataset
    from circuit_discovery.pipeline import RunConfig, run_pipeline

    seed_path, rich_path = seed_and_rich(tmp_path)
    assert load_dataset(seed_path)["language"] == load_dataset(rich_path)["language"]
    nodes = []
    for name, path in (("seed", seed_path), ("rich", rich_path)):
        res = run_pipeline(RunConfig(model="tiny-gemma3", dataset=str(path), out=str(tmp_path / name), known_k=10**6,
                                     quick=True, quick_facts=4, quick_held_out=2, features=False, n_random=19,
                                     progress=False))
        circuits = json.loads((res.out_dir / "circuits.json").read_text())["circuits"]
        assert [c["name"] for c in circuits] == ["language"]
        nodes.append([n["id"] for n in circuits[0]["nodes"]])
    assert nodes[0] and nodes[0] == nodes[1]
