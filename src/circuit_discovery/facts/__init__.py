"""Relations, facts, clean/corrupted fact pairs, dataset formats and the known-fact filter.

>>> ds = load_builtin()                       # the default selection: 20 relations of well-known facts
>>> discovery, held_out = split_facts(ds["capital_city"], held_out_fraction=0.4, tokenizer=tokenizer)
>>> pairs = build_pairs(discovery, tokenizer, seed=0)   # partners only from the discovery facts
>>> known, report = filter_known(model, ds, k=1)
"""
from circuit_discovery.facts.known import (
    FactScore,
    KnownReport,
    RelationAccuracy,
    answer_ranks,
    filter_known,
)
from circuit_discovery.facts.loaders import (
    RICH_SCHEMA,
    WIKIDATA_RELATIONS,
    builtin_relations,
    check_subject_tokens,
    detect_format,
    guess_subject,
    infer_seed_relation,
    load_builtin,
    load_counterfact,
    load_dataset,
    load_known_1000,
    load_rich,
    load_seed,
    split_seed,
)
from circuit_discovery.facts.pairs import (
    DEFAULT_HELD_OUT_FRACTION,
    PairError,
    align_answer,
    answer_tokens,
    build_pairs,
    encode,
    group_by_length,
    informative_pair,
    pair_group_key,
    prepare_fact,
    split_facts,
    stack_pairs,
    subject_span,
    token_roles,
)
from circuit_discovery.facts.types import (
    ROLES,
    TEMPLATE_SOURCES,
    Dataset,
    DatasetError,
    Fact,
    FactPair,
    Relation,
    RelationTemplate,
    fact_template,
    select_relations,
    template_lines,
    with_answer,
)

__all__ = [
    "DEFAULT_HELD_OUT_FRACTION", "ROLES", "RICH_SCHEMA", "TEMPLATE_SOURCES", "WIKIDATA_RELATIONS",
    "Dataset", "DatasetError", "Fact", "FactPair", "FactScore", "KnownReport", "PairError", "Relation",
    "RelationAccuracy", "RelationTemplate", "check_subject_tokens", "fact_template", "infer_seed_relation",
    "template_lines",
    "align_answer", "answer_ranks", "answer_tokens", "build_pairs", "informative_pair", "builtin_relations",
    "detect_format",
    "encode", "filter_known", "group_by_length", "guess_subject", "load_builtin", "load_counterfact",
    "load_dataset", "load_known_1000", "load_rich", "load_seed", "pair_group_key", "prepare_fact",
    "select_relations", "split_facts", "split_seed", "stack_pairs", "subject_span", "token_roles", "with_answer",
]
