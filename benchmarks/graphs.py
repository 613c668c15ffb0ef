"""Benchmark graph building on the built-in model: one component circuit for a relation.

    python benchmarks/graphs.py --quick --out graphs_bench.json    # 6 facts
    python benchmarks/graphs.py --out graphs_bench.json            # 20 facts

Writes {"component_circuit_s", "feature_graph_s", "nodes_before", "nodes_after", "edges_before", "edges_after",
"faithfulness", "settings", ...}. The node/edge counts are those of the component circuit (the relation-level,
role-keyed graph before and after influence pruning); ``feature_graph_s`` is null with a reason until the
feature-graph (SAE/transcoder) work lands.
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
    args = ap.parse_args(argv)

    import torch

    from circuit_discovery.facts import build_pairs, load_builtin
    from circuit_discovery.graph.component import component_circuit
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
           "feature_graph_reason": "feature graphs (SAE/transcoder) are built elsewhere; not benchmarked here",
           **res.info, "n_facts": len(pairs), "model_load_s": round(load_s, 2),
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
                   circuit_node_share=len(comp_nodes) / len(ev.universe), faithfulness_s=round(time.perf_counter() - t0, 2))
    atomic_write_json(args.out, out)
    print(out)
    return out


if __name__ == "__main__":
    main()
