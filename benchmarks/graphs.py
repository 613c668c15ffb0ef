"""Benchmark graph building on the built-in model: one component circuit for a relation, one per-prompt feature graph
per dictionary kind.

    python benchmarks/graphs.py --quick --out graphs_bench.json    # 6 facts
    python benchmarks/graphs.py --out graphs_bench.json            # 20 facts
    python benchmarks/graphs.py --out b.json --kinds topk_transcoder jumprelu_skip_transcoder clt
    python benchmarks/graphs.py --out b.json --dictionaries PATH   # a loaded transcoder set too

Writes {"component_circuit_s", "feature_graph_s", "nodes_before", "nodes_after", "edges_before", "edges_after",
"component": {...}, "feature": {...}, "feature_graphs": [...], "settings", ...}. The top-level node/edge counts and
``feature_graph_s`` are the first kind's feature graph (before and after influence pruning at node_threshold 0.8,
edge_threshold 0.98); ``feature_graphs`` has one entry per dictionary kind with ``{"kind", "feature_graph_s",
"replacement_score", "completeness_score", "error_influence_share", ...}`` and how its dictionaries were obtained
(``dictionaries``: cached / trained now at ``training_tokens`` per layer / loaded; their training time is not graph
time). Goals: component circuit <= 60 s, each feature graph <= 120 s (``goals_met``). ``topk_transcoder`` uses the
default-budget (100,000 tokens/layer) transcoders when they are cached (train them once with ``python -c "from
circuit_discovery.models import load_model; from circuit_discovery.sae import train_transcoders;
train_transcoders(load_model('gemma-3-270m'))"`` or any run with features; ``--train`` trains them when missing,
about 10-15 minutes on 2 cores); otherwise, and for the other kinds, dictionaries trained at ``--kind-tokens``
tokens per layer (cached; exactness and timing do not need a good dictionary; their quality is docs/sae.md's
subject). Each entry says which (``dictionaries``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from circuit_discovery.io import atomic_write_json  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6 facts instead of 20")
    ap.add_argument("--out", required=True, help="output JSON file")
    ap.add_argument("--model", default=None, help="model name for load_model (default: built-in Gemma 3 270M)")
    ap.add_argument("--relation", default="capital_city")
    ap.add_argument("--n-facts", type=int, default=None)
    ap.add_argument("--method", default="eap", choices=["eap", "eap-ig"])
    ap.add_argument("--n-steps", type=int, default=5)
    ap.add_argument("--granularity", default="head", choices=["head", "layer"])
    ap.add_argument("--no-faithfulness", action="store_true", help="skip the faithfulness evaluation")
    ap.add_argument("--feature-nodes", type=int, default=256, help="max feature nodes of the feature graph")
    ap.add_argument("--train", action="store_true", help="train the transcoders when they are not cached")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--kinds", nargs="*", default=["topk_transcoder"],
                    help="dictionary kinds to time a feature graph on (topk_transcoder, jumprelu_transcoder, "
                         "jumprelu_skip_transcoder, clt)")
    ap.add_argument("--kind-tokens", type=int, default=10_240,
                    help="training tokens per layer for kinds other than topk_transcoder when not cached")
    ap.add_argument("--dictionaries", default=None, help="also time a graph on this loaded transcoder set")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from circuit_discovery.attribution.component_graph import component_circuit
    from circuit_discovery.facts import build_pairs, load_builtin
    from circuit_discovery.models import load_model
    from circuit_discovery.validation.ablation import CircuitEvaluator

    n_facts = args.n_facts or (6 if args.quick else 20)
    t0 = time.perf_counter()
    model = load_model(args.model, device="cpu")
    load_s = time.perf_counter() - t0
    facts = load_builtin()[args.relation]
    pairs = [p for p in build_pairs(facts, model.tokenizer) if p.corruption == "subject_swap"
             and p.first_token_differs][:n_facts]
    t0 = time.perf_counter()
    res = component_circuit(model, pairs, method=args.method, n_steps=args.n_steps, granularity=args.granularity)
    circuit_s = time.perf_counter() - t0
    out = {"component_circuit_s": round(circuit_s, 2), "feature_graph_s": None,
           "component": dict(res.info), "n_facts": len(pairs), "model_load_s": round(load_s, 2),
           "attribution_score": res.circuit.attribution_score,
           "settings": {"model": model.cfg.model_name, "relation": args.relation, "method": args.method,
                        "n_steps": args.n_steps if args.method == "eap-ig" else 1,
                        "granularity": args.granularity, "threads": torch.get_num_threads()}}
    if not args.no_faithfulness:
        t0 = time.perf_counter()
        ev = CircuitEvaluator(model, pairs, granularity=args.granularity)
        mf, me = ev.references()
        comp_nodes = [i for i in res.circuit.node_ids if not i.startswith("logit")]
        out.update(faithfulness=ev.faithfulness(comp_nodes), m_full=mf, m_empty=me,
                   circuit_node_share=len(comp_nodes) / len(ev.universe),
                   faithfulness_s=round(time.perf_counter() - t0, 2))
    entries = []
    for kind in list(args.kinds) + (["loaded"] if args.dictionaries else []):
        entries.append(feature_benchmark(model, pairs[0], args, kind))
    first = entries[0] if entries else {"feature_graph_s": None}
    out.update({k: v for k, v in first.items() if k in ("feature_graph_s", "feature_graph_reason", "nodes_before",
                                                         "nodes_after", "edges_before", "edges_after", "feature")})
    out["feature_graphs"] = entries
    times = [e["feature_graph_s"] for e in entries if e.get("feature_graph_s") is not None]
    out["goals"] = {"component_circuit_s": 60, "feature_graph_s": 120}
    out["goals_met"] = bool(circuit_s <= 60 and times and max(times) <= 120)
    atomic_write_json(args.out, out)
    print(out)
    return out


def _cached_default_topk(model) -> str | None:
    """``None`` when the default-budget TopK transcoders are all in the cache, else why not."""
    from dataclasses import replace

    from circuit_discovery.sae.corpus import build_corpus
    from circuit_discovery.sae.dictionaries import transcoder_configs
    from circuit_discovery.sae.io import load_cached_sae, sae_cache_key

    corpus = build_corpus(model, count_tokens=False)
    for c in transcoder_configs(model.cfg.n_layers):
        c = replace(c, model_name=model.cfg.model_name, context_size=128)
        if load_cached_sae(None, sae_cache_key(model.cfg.model_name, c.key, c, corpus.corpus_id)) is None:
            return f"transcoder {c.key} is not cached; rerun with --train"
    return None


def feature_benchmark(model, pair, args, kind: str = "topk_transcoder") -> dict:
    """Time one per-prompt feature graph on dictionaries of ``kind`` (``"loaded"``: ``args.dictionaries``) and
    prune it; the exactness residual and circuit-tracer's scores of the graph come with it."""
    from circuit_discovery.attribution.feature_graph import DictionaryView, feature_graph
    from circuit_discovery.graph import prune_graph
    from circuit_discovery.sae.dictionaries import train_transcoders

    t0 = time.perf_counter()
    if kind == "loaded":
        from circuit_discovery.sae.pretrained import load_transcoder_set

        ts = load_transcoder_set(args.dictionaries, model=model.cfg.model_name)
        ts.check_model(model)
        how: dict = {"dictionaries": f"loaded: {args.dictionaries}", "trained_now": []}
    else:
        tokens = args.kind_tokens
        if kind == "topk_transcoder" and (args.train or _cached_default_topk(model) is None):
            tokens = 100_000  # the default budget: from the cache, or trained now with --train
        ds = train_transcoders(model, kind=kind, training_tokens=tokens, progress=False)
        ts = ds.transcoder_set
        how = {"dictionaries": f"trained here: {kind}, {tokens:,} tokens/layer", "training_tokens": tokens,
               "trained_now": ds.trained}
    view = DictionaryView(model, ts)
    dict_s = time.perf_counter() - t0
    extra = [int(pair.answer_tokens[0]), int(pair.counterfactual_tokens[0])]
    t0 = time.perf_counter()
    res = feature_graph(model, view, list(pair.clean_tokens), extra_logits=extra,
                        max_feature_nodes=args.feature_nodes, batch_size=32)
    graph_s = time.perf_counter() - t0
    g = res.graph
    pr = prune_graph(g, node_threshold=0.8, edge_threshold=0.98)
    t = [i for i, nd in enumerate(g.nodes) if nd.kind in ("intermediate", "logit")]
    resid = (g.adjacency.sum(1) + res.bias - res.node_input)[t].abs().max()
    edges_after = int((pr.edge_mask & pr.node_mask[:, None] & pr.node_mask[None, :] & (g.adjacency != 0)).sum())
    sc = res.scores()
    return {"kind": view.kind if kind != "loaded" else f"loaded {view.kind}", "activation": view.activation,
            "feature_graph_s": round(graph_s, 2), "replacement_score": sc["replacement_score"],
            "completeness_score": sc["completeness_score"], "error_influence_share": sc["error_influence_share"],
            "nodes_before": g.n_nodes, "nodes_after": int(pr.node_mask.sum()),
            "edges_before": int((g.adjacency != 0).sum()), "edges_after": edges_after, **how,
            "feature": {"prompt": g.prompt, "n_tokens": len(g.prompt_tokens), "active_features": res.n_active_features,
                        "visited_features": res.n_visited, "logit_nodes": len(res.logit_tokens),
                        "max_abs_completeness_error": float(resid),
                        "max_abs_node_input": float(res.node_input[t].abs().max()),
                        "dictionaries_load_s": round(dict_s, 2)}}


if __name__ == "__main__":
    main()
