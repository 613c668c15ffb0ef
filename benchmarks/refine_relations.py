"""Component circuits with circuit_search="refine" on named relations, validated as the default run does.

    python benchmarks/refine_relations.py capital_city,person_nationality [--out F.json]

Writes per relation: held-out f with CI, node share of the non-inert nodes, matched and top-M p, f at 1-20%,
validated, and the refinement's record (results of a run: benchmarks/results/circuit_search_refine_default_run.json).
"""
import torch, time, json, sys
torch.set_num_threads(2)
from circuit_discovery import load_model
from circuit_discovery.facts import load_builtin, filter_known
from circuit_discovery.pipeline.config import RunConfig
from circuit_discovery.pipeline.attribution_stage import relation_pairs
from circuit_discovery.pipeline.circuit_stage import circuit_for_relation, validate_relation
rels = sys.argv[1].split(",")
out_path = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "refine_results.json"
m = load_model(device="cpu")
ds = load_builtin().select(rels)
known, rep = filter_known(m, ds, k=1, batch_size=64, progress=False)
cfg = RunConfig(circuit_search="refine", progress=False)
out = {}
for rel in rels:
    t = time.time()
    pairs = relation_pairs(m, list(known[rel]), cfg)
    found = circuit_for_relation(m, rel, pairs, cfg, None)
    t1 = time.time() - t
    v = validate_relation(m, pairs, found, cfg)
    h = v["held_out"]
    out[rel] = {"circuit_seconds": round(t1, 1), "validate_seconds": round(time.time() - t - t1, 1),
                "held_out_faithfulness": h["faithfulness"], "held_out_ci": h["ci"], "node_share": h["node_share"],
                "circuit_size": h["circuit_size"], "n_universe": h["n_universe"], "random_p": h["random_p"],
                "topm_p": h["topm_p"], "faithfulness_at": h["faithfulness_at"], "in_sample": v["in_sample"]["faithfulness"],
                "validated": v["validated"], "refine": {k: x for k, x in found["info"].items() if k.startswith("refine_")}}
    print(rel, json.dumps(out[rel]), flush=True)
    json.dump({"config": {"circuit_search": "refine", "refine_budget": cfg.refine_budget, "max_facts": cfg.max_facts,
                          "held_out_facts": cfg.held_out_facts, "n_random": cfg.n_random, "threads": 2},
               "relations": out}, open(out_path, "w"), indent=1)
