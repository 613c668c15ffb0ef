"""The two splits of a distributed run that are not by relation (``pipeline/run.py``, ``pipeline/feature_stage.py``):
the known filter's batches of facts and the transcoder layers. Oracle: the same computation done all at once in one
process; both must be bit-identical (no tolerance), whatever part of the work each rank gets and in which order."""
import json

import pytest
import torch


@pytest.fixture(scope="module")
def model():
    from circuit_discovery.models import load_model

    return load_model("tiny-gemma3", device="cpu")


def test_known_batches_dealt_in_any_order_give_the_one_process_report(model):
    """The batches of the known filter, computed by two "ranks" (round robin) in reverse order and merged, give the
    report of :func:`find_known` byte for byte; and the batches are contiguous runs of the dataset's facts."""
    from circuit_discovery.facts import load_builtin
    from circuit_discovery.pipeline import RunConfig
    from circuit_discovery.pipeline.distributed import share_of
    from circuit_discovery.pipeline.run import find_known, known_batch, known_batches, merge_known

    cfg = RunConfig(model="tiny-gemma3", known_k=50, progress=False, device="cpu")
    ds = load_builtin(["capital_city", "city_country", "historical_date"])
    batches = known_batches(ds, cfg)
    assert len(batches) >= 2                                        # the split has something to deal
    assert [f for _, facts in batches for f in facts] == list(ds.facts)
    assert batches[0][0] == "facts 0-63" and batches[-1][0] == f"facts {64 * (len(batches) - 1)}-{ds.n_facts - 1}"
    parts: dict[int, dict] = {}
    for rank in (1, 0):
        for i in reversed(share_of(len(batches), rank, 2)):
            parts[i] = json.loads(json.dumps(known_batch(model, batches[i][1], cfg)))   # as sent between ranks
    merged = merge_known([parts[i] for i in range(len(batches))], cfg.known_k).to_dict()
    whole = find_known(model, ds, cfg).to_dict()
    assert json.dumps(merged) == json.dumps(whole)
    assert 0 < whole["n_known"] < whole["n"] == ds.n_facts              # known and unknown facts both occur
    assert list(whole["per_relation"]) == ds.relation_names


def test_transcoders_trained_layer_by_layer_equal_those_trained_together(model, tmp_path):
    """Each per-layer transcoder is seeded by its own config, and its activations do not depend on the other hooks
    harvested: layers 0 and 1 trained in two calls (as two ranks do) have the weights of the two trained in one."""
    from safetensors.torch import load_file

    from circuit_discovery.sae.dictionaries import train_transcoders

    def train(layers, cache):
        return train_transcoders(model, layers=layers, training_tokens=1024, n_sequences=4, progress=False,
                                 cache_dir=tmp_path / cache, corpus_cache_dir=tmp_path / "corpus",
                                 kind="jumprelu_skip_transcoder")

    together = train([0, 1], "together")
    apart = {0: train([0], "apart"), 1: train([1], "apart")}
    assert together.trained == [0, 1] and apart[0].trained == [0] and apart[1].trained == [1]
    for layer in (0, 1):
        a, b = together.transcoders[layer].state_dict(), apart[layer].transcoders[layer].state_dict()
        assert a.keys() == b.keys() and a
        for name in a:
            assert torch.equal(a[name], b[name]), (layer, name)
    assert not torch.equal(together.transcoders[0].W_enc, together.transcoders[1].W_enc)   # the check can fail
    # the same files in the cache, under the same keys (what the ranks of a run write and rank 0 then reads)
    saved = {p.parent.name: load_file(p) for p in (tmp_path / "together").glob("*/sae_weights.safetensors")}
    again = {p.parent.name: load_file(p) for p in (tmp_path / "apart").glob("*/sae_weights.safetensors")}
    assert saved.keys() == again.keys() and len(saved) == 2
    for key, tensors in saved.items():
        assert tensors.keys() == again[key].keys()
        assert all(torch.equal(t, again[key][n]) for n, t in tensors.items()), key
