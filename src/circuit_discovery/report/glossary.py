"""The report's glossary: every term report.md uses as a table column or as a row of a per-circuit table, with its
meaning, its unit and its unit of observation (:data:`GLOSSARY`). report.md prints it as the table "Glossary"
(:func:`circuit_discovery.report.markdown.glossary_table`).
"""
from __future__ import annotations

__all__ = ["GLOSSARY"]


def _g(term: str, meaning: str, unit: str, observation: str) -> dict[str, str]:
    return {"term": term, "meaning": meaning, "unit": unit, "observation": observation}


_F = ("f = (m(C) - m(empty)) / (m(N) - m(empty)), m the logit difference averaged over the prompts, m(N) with the "
      "whole model, m(empty) with every node set to its value on the corrupted prompt (counterfactual subject), "
      "m(C) with the nodes outside circuit C set so. f = 1: the circuit recovers the whole model's preference for the "
      "answer; f = 0: nothing; f < 0: the circuit alone prefers the counterfactual answer; f > 1: it prefers the "
      "answer more than the model does. Undefined (shown 'degenerate') where |m(N) - m(empty)| < 0.5 logits")

#: Every term report.md uses as a table column or as a row of a per-circuit table, with its unit and the unit of
#: observation (what one measurement is taken on); report.md prints it as the table "Glossary".
GLOSSARY: list[dict[str, str]] = [
    _g("f", _F, "ratio of logit differences (1 = whole model)", "the set of prompts named by the column"),
    _g("logit difference m(N) / m(empty) (held out)",
       "m = logit(answer) - logit(counterfactual answer) at the last token, mean over the held-out prompts; "
       "positive when the model prefers the true answer. m(N): clean run; m(empty): every node ablated "
       "(corrupted values)", "logits", "prompt (mean over held-out prompts)"),
    _g("circuit", "The circuit a row describes, as named in circuits.json: <relation> is the relation's component "
       "circuit (attention heads, MLPs and embeddings per token role), <relation>/features its transcoder-feature "
       "circuit", "—", "circuit"),
    _g("relation", "The kind of fact (e.g. capital_city). In the hypotheses table: the relation(s) a row tests, "
       "'all' when pooled over relations", "—", "relation"),
    _g("facts used (discovery / held out)", "Facts (a prompt and its counterfactual) the circuit was found on / "
       "validated on. Each relation's known facts are split into discovery and held-out facts before any pair is "
       "made; a feature circuit is built from the first `feature_facts` discovery facts only", "facts",
       "fact (one prompt with its counterfactual)"),
    _g("held-out f [95% CI]", "f on the held-out facts; bracket: 95% percentile bootstrap interval over held-out "
       "prompts. Feature circuits: measured in the transcoder replacement model", "ratio (1 = whole model)",
       "prompt (bootstrap resamples held-out prompts)"),
    _g("held-out f, live errors [95% CI]", "Feature circuits: f on the held-out facts with the real MLPs running "
       "and each ablated feature adding its decoder-direction change (circuit-tracer's interventions); 95% "
       "bootstrap interval over prompts", "ratio (1 = whole model)", "prompt (bootstrap over held-out prompts)"),
    _g("in-sample f", "f on the discovery facts the circuit was found on (optimistic: selection and measurement "
       "share the prompts)", "ratio (1 = whole model)", "discovery prompts (one value)"),
    _g("matched random p (draws)", "Share of random circuits with f >= the circuit's held-out f, +1-corrected "
       "((k + 1) / (draws + 1)); each random circuit keeps the circuit's embedding nodes and its number of nodes "
       "per (component, layer, token role). Smallest possible p = 1 / (draws + 1); draws in brackets",
       "probability", "random circuit (draw), f on the held-out prompts"),
    _g("matched random mean f", "Mean held-out f of the matched random circuits", "ratio (1 = whole model)",
       "random circuit (draw)"),
    _g("matched random exact zeros", "Share of matched random circuits whose f is exactly 0", "share (0-1)",
       "random circuit (draw)"),
    _g("(component, role) random: mean f, p", "Random circuits matched on (component, token role) only, other "
       "layers allowed: mean held-out f, and p as for the matched random p", "ratio; probability",
       "random circuit (draw)"),
    _g("top-ranked random subsets: mean f, p", "Random subsets of the top-ranked nodes of the circuit's size: mean "
       "held-out f and the +1-corrected share with f >= the circuit's", "ratio; probability",
       "random subset (draw)"),
    _g("last-token f", "Held-out f of every node at the last token (plus the embeddings): a circuit-free baseline",
       "ratio (1 = whole model)", "held-out prompts (one value)"),
    _g("cross-relation f", "f of this circuit on another relation's facts (that relation in brackets)",
       "ratio (1 = whole model)", "the other relation's prompts (one value)"),
    _g("nodes (% of non-inert)", "Circuit nodes inside the non-inert universe, and their share of it (node share). "
       "The logit node is not counted", "nodes (%)", "node"),
    _g("non-inert nodes (held out)", "Nodes whose output differs between the clean and the corrupted run on at "
       "least one held-out prompt: the universe of node shares, curves and random draws", "nodes", "node"),
    _g("inert nodes left out", "Nodes whose ablation changes nothing (BOS, positions before the subject, "
       "embeddings of unchanged tokens); left out of node shares, curves and random draws", "nodes", "node"),
    _g("held-out f at 1 / 2 / 5 / 10 / 20% of the non-inert nodes", "Held-out f of the top-ranked nodes (discovery "
       "ranking) at these fractions of the non-inert universe; the points of the faithfulness curves figure",
       "ratio (1 = whole model)", "held-out prompts (one value per fraction)"),
    _g("held-out CPR", "Circuit performance ratio: area under the node-level held-out faithfulness curve over the "
       "ten fractions 0.1% ... 100% (MIB's trapezoid on a linear axis, so 20-100% weighs most; node-level, not "
       "MIB's edge-level score); higher is better",
       "ratio (area under f, 0-1 for f in [0, 1])", "held-out prompts (one curve)"),
    _g("held-out CMD", "Circuit-model distance: area between the held-out faithfulness curve and f = 1 (MIB's "
       "|1 - f| trapezoid, node level); lower is better", "ratio (area, 0 = the whole model's behaviour)",
       "held-out prompts (one curve)"),
    _g("validated", "yes when held-out f >= 0.7 with 95% CI lower bound >= 0.5, matched random p < 0.01 and the "
       "circuit uses <= 10% of the non-inert nodes", "yes / no", "circuit"),
    _g("finding", "yes when the circuit is validated and (feature circuits) every layer's transcoder meets the "
       "dictionary quality bar; only findings are counted in the summary (circuit_finding)", "yes / no", "circuit"),
    _g("dictionaries meet the bar", "Every layer's transcoder reaches EV >= 0.8, CE-loss score >= 0.85, dead share "
       "<= 0.1 and L0 <= 64 (the replacement model replaces every layer's MLP)", "yes / no",
       "transcoder (one per layer)"),
    _g("attribution score", "Share of the attribution mass (sum of |node score| over the graph's nodes, logits "
       "excluded) that the circuit's nodes hold", "share (0-1)", "combined discovery graph"),
    _g("top nodes", "The circuit's nodes with the largest |score| (logit and score-0 nodes left out), named by "
       "layer, component and the representative prompt's tokens at the node's token role (role in brackets)",
       "—", "node"),
    _g("top nodes (score)", "As top nodes, with the node's score in brackets: its attribution (EAP: estimated "
       "change of the logit difference when the node is patched from corrupted to clean), averaged over the "
       "discovery prompts' graphs", "logits", "node (mean over discovery prompts)"),
    _g("verdicts", "The verdicts of the hypothesis tests that involve this relation (table Hypotheses)", "—",
       "hypothesis test"),
    _g("prompt template", "The relation's prompt template and how it was found", "—", "relation"),
    _g("representative prompt", "The prompt whose tokens name the nodes (the circuit's first fact)", "—",
       "prompt"),
    _g("replacement score", "circuit-tracer's graph replacement score: share of the graph's influence on the "
       "logit that flows from features and embeddings rather than error nodes (1 = no error influence); mean over "
       "the discovery graphs", "share (0-1)", "per-prompt attribution graph"),
    _g("completeness score", "circuit-tracer's graph completeness score: share of each node's input explained by "
       "non-error nodes, weighted by influence (1 = no error input); mean over the discovery graphs",
       "share (0-1)", "per-prompt attribution graph"),
    _g("error share of influence", "Share of the logit's total influence that comes from error nodes; mean over "
       "the discovery graphs", "share (0-1)", "per-prompt attribution graph"),
    _g("f: embeddings + all errors", "f of the embeddings and every error node alone (replacement model, discovery "
       "facts): how much the transcoders' errors carry without any feature", "ratio (1 = whole model)",
       "discovery prompts (one value)"),
    _g("f: features only", "f of every feature with the error nodes ablated (replacement model, discovery facts)",
       "ratio (1 = whole model)", "discovery prompts (one value)"),
    _g("necessity drop", "Mean drop of the per-prompt logit difference when the circuit's top features are ablated "
       "(live errors)", "logits", "held-out prompt"),
    _g("random-feature drop", "The same drop for as many random active features matched per (layer, role)",
       "logits", "held-out prompt (mean over random draws)"),
    _g("steering flip rate", "Share of held-out prompts whose answer flips to the counterfactual when the circuit's "
       "subject features take the counterfactual subject's values", "share (0-1)", "held-out prompt"),
    _g("random flip rate", "The same share for random subject features", "share (0-1)",
       "held-out prompt (mean over random draws)"),
    _g("most-overlapping circuit", "The other component circuit with the largest Jaccard", "—", "circuit pair"),
    _g("Jaccard", "|A ∩ B| / |A ∪ B| of two circuits' node sets, each restricted to its relation's non-inert nodes "
       "(logit node left out); the matrix circuit_overlap.png draws", "ratio (0-1)", "circuit pair"),
    _g("mean Jaccard with the other circuits", "Mean Jaccard of this circuit with every other component circuit",
       "ratio (0-1)", "circuit pair"),
    _g("layer", "Transformer layer of the transcoder (0 = first)", "—", "layer"),
    _g("EV", "Explained variance of the MLP output by the transcoder on held-out corpus tokens (bar >= 0.8)",
       "share (<= 1)", "token (held-out corpus)"),
    _g("CE-loss score", "SAELens CE-loss score: (CE with the MLP zero-ablated - CE with the transcoder spliced in) / "
       "(CE zero-ablated - clean CE); 1 = no loss increase, negative = worse than removing the MLP (bar >= 0.85)",
       "ratio", "token (held-out corpus)"),
    _g("dead share", "Share of latents that never fire on the held-out tokens (bar <= 0.1)", "share (0-1)",
       "latent"),
    _g("L0", "Mean number of active latents per token (TopK: k) (bar <= 64)", "latents per token", "token"),
    _g("meets the bar", "The layer's transcoder meets all four bars (EV, CE-loss score, dead share, L0)", "yes / no",
       "transcoder"),
    _g("facts in the dataset", "The relation's facts in the dataset", "facts", "fact"),
    _g("known facts", "Facts whose every answer token ranks <= known_k on the prompt (the model knows them)",
       "facts", "fact"),
    _g("known share", "known facts / facts in the dataset", "%", "fact"),
    _g("hypothesis_id", "The pre-registered hypothesis (validation.hypotheses)", "—", "hypothesis"),
    _g("statistic", "What the effect measures (its test in the name)", "—", "test"),
    _g("effect", "The test's effect size, in the unit its statistic names (e.g. a faithfulness, a logit drop, a "
       "share); the shared_mechanism effect is a share of overlaps, not a Jaccard", "as the statistic", "as n"),
    _g("ci_low", "Lower end of the effect's 95% interval (bootstrap or sign-flip over the units n counts)",
       "as the effect", "as n"),
    _g("ci_high", "Upper end of the effect's 95% interval", "as the effect", "as n"),
    _g("p_value", "The test's p-value against its null (no effect)", "probability", "as n"),
    _g("p_adjusted", "p-value adjusted by Benjamini-Hochberg within the hypothesis' family", "probability", "as n"),
    _g("n", "Number of independent units the test uses (prompts, facts or relations), never resamples", "count",
       "unit named by the statistic"),
    _g("verdict", "supported: p_adjusted < 0.05 with the effect in the predicted direction; not supported: "
       "significant the wrong way, or the CI lies on the null side; inconclusive: anything else", "—", "test"),
    _g("setting", "A run option (config.json's config)", "—", "run"),
    _g("value", "The setting's or quantity's value, in the unit the glossary gives", "as the term", "as the term"),
    _g("quantity", "A number measured on the circuit of the section (defined in this glossary)", "—", "circuit"),
    _g("stage", "A pipeline stage (docs/ARCHITECTURE.md); load_model: loading the model", "—", "stage"),
    _g("time", "The stage's compute time when it ran (stages/<stage>.json `_seconds`, the same values as "
       "config.json's timings)", "seconds (and minutes)", "stage run"),
]
