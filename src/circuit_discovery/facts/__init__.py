"""Relations, facts, clean/corrupted fact pairs, dataset formats and the known-fact filter.

>>> ds = load_builtin()                       # 19 relations of simple, well-known facts
>>> pairs = build_pairs(ds["capital_city"], tokenizer, seed=0)
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
    detect_format,
    guess_subject,
    load_builtin,
    load_counterfact,
    load_dataset,
    load_known_1000,
    load_rich,
    load_seed,
    split_seed,
)
from circuit_discovery.facts.pairs import (
    PairError,
    align_answer,
    answer_tokens,
    build_pairs,
    informative_pair,
    encode,
    group_by_length,
    prepare_fact,
    stack_pairs,
    subject_span,
    token_roles,
)
from circuit_discovery.facts.types import (
    ROLES,
    Dataset,
    DatasetError,
    Fact,
    FactPair,
    Relation,
    select_relations,
    with_answer,
)

__all__ = [
    "ROLES", "RICH_SCHEMA", "WIKIDATA_RELATIONS",
    "Dataset", "DatasetError", "Fact", "FactPair", "FactScore", "KnownReport", "PairError", "Relation",
    "RelationAccuracy",
    "align_answer", "answer_ranks", "answer_tokens", "build_pairs", "informative_pair", "builtin_relations", "detect_format",
    "encode", "filter_known", "group_by_length", "guess_subject", "load_builtin", "load_counterfact",
    "load_dataset", "load_known_1000", "load_rich", "load_seed", "prepare_fact", "select_relations",
    "split_seed", "stack_pairs", "subject_span", "token_roles", "with_answer",
]
