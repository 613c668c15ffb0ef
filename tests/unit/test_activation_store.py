"""The on-disk activation store: exact rows back, and training from it equals training from memory."""
import json

import pytest
import torch

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.sae.activation_store import ActivationStore, ActivationStoreError
from circuit_discovery.sae.training import SAETrainConfig, train_saes

HOOKS = {"blocks.0.mlp.hook_in": 12, "blocks.0.hook_mlp_out": 12}


def _data(n=203, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {h: torch.randn(n, d, generator=g) for h, d in HOOKS.items()}


def _write(folder, data, chunk=17, shard_rows=50, dtype="float32"):
    store = ActivationStore.create(folder, HOOKS, shard_rows=shard_rows, dtype=dtype)
    n = next(iter(data.values())).shape[0]
    for i in range(0, n, chunk):
        store.append({h: t[i:i + chunk] for h, t in data.items()})
    return store.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rows_come_back_exactly_in_any_order(tmp_path, dtype):
    data = _data()
    _write(tmp_path / "s", data, dtype=dtype)
    st = ActivationStore.open(tmp_path / "s")
    assert st.rows == 203 and len(st._rows) == 5  # 4 full shards of 50 and the rest
    src = st.source()
    idx = torch.randperm(203, generator=torch.Generator().manual_seed(1))[:97]
    for h, t in data.items():
        want = t.to(getattr(torch, dtype))
        assert src[h].shape == (203, 12)
        assert torch.equal(src[h][idx], want[idx])  # bit-exact, rows drawn across shard boundaries
        assert torch.equal(src[h][torch.arange(203)], want)


def test_training_from_the_store_equals_training_from_memory(tmp_path):
    data = _data(n=512)
    _write(tmp_path / "s", data, chunk=64, shard_rows=100)
    cfg = SAETrainConfig("blocks.0.mlp.hook_in", hook_name_out="blocks.0.hook_mlp_out", architecture="topk", k=4,
                         expansion_factor=2, train_batch_size_tokens=64, training_tokens=1024, seed=3, log_every=1)
    mem = train_saes(data, cfg, progress=False)[cfg.key].sae
    disk = train_saes(ActivationStore.open(tmp_path / "s").source(), cfg, progress=False)[cfg.key].sae
    for (name, a), (_, b) in zip(mem.state_dict().items(), disk.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # and the store is not a no-op: other rows give another dictionary
    other = train_saes(_data(n=512, seed=9), cfg, progress=False)[cfg.key].sae
    assert not torch.equal(other.W_enc, mem.W_enc)


def test_bad_stores_are_refused_with_what_to_do(tmp_path):
    assert issubclass(ActivationStoreError, CircuitDiscoveryError)
    data = _data()
    st = ActivationStore.create(tmp_path / "u", HOOKS, shard_rows=50)
    st.append({h: t[:60] for h, t in data.items()})  # one shard written, no manifest yet
    with pytest.raises(ActivationStoreError, match="unfinished"):
        ActivationStore.open(tmp_path / "u")
    with pytest.raises(ActivationStoreError, match="width"):
        st.append({"blocks.0.mlp.hook_in": torch.zeros(3, 12), "blocks.0.hook_mlp_out": torch.zeros(3, 5)})
    assert [len(v) for v in st._buf.values()] == [1, 1]  # nothing of the refused rows was added to either hook
    with pytest.raises(ActivationStoreError, match="row counts"):
        st.append({"blocks.0.mlp.hook_in": torch.zeros(3, 12), "blocks.0.hook_mlp_out": torch.zeros(4, 12)})
    with pytest.raises(ActivationStoreError, match="hooks"):
        st.append({"blocks.0.mlp.hook_in": torch.zeros(3, 12)})
    folder = _write(tmp_path / "t", data)
    with pytest.raises(ActivationStoreError, match="already holds"):
        ActivationStore.create(folder, HOOKS)
    shard = folder / "blocks.0.mlp.hook_in" / "00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])  # truncated
    with pytest.raises(ActivationStoreError, match="truncated"):
        ActivationStore.open(folder).source()
    m = json.loads((folder / "manifest.json").read_text())
    m["shard_rows"][0] = 49
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ActivationStoreError, match="manifest says"):
        ActivationStore.open(folder).source(["blocks.0.hook_mlp_out"])
    with pytest.raises(ActivationStoreError, match="holds no"):
        ActivationStore.open(folder).source(["blocks.1.mlp.hook_in"])
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ActivationStoreError, match="damaged"):
        ActivationStore.open(folder)
    m["shard_rows"][0] = 50
    (folder / "manifest.json").write_text(json.dumps(m))
    (folder / "blocks.0.hook_mlp_out" / "00002.safetensors").unlink()
    with pytest.raises(ActivationStoreError, match="cannot be read"):
        ActivationStore.open(folder).source(["blocks.0.hook_mlp_out"])


def _train_kinds(model, tmp_path, activations, kind, **extra):
    from circuit_discovery.sae.dictionaries import train_transcoders

    return train_transcoders(model, kind=kind, training_tokens=1024, n_sequences=4, progress=False, k=4,
                             cache_dir=tmp_path / activations / "saes", corpus_cache_dir=tmp_path / "corpus",
                             activations=activations, **extra)


@pytest.mark.parametrize("kind", ["jumprelu_skip_transcoder", "clt"])
def test_a_run_trains_the_same_dictionaries_from_disk_as_from_memory(tmp_path, kind, monkeypatch):
    """The pipeline's path (train_transcoders -> harvest into a store on disk -> train by memory map, one layer's
    transcoder at a time here) gives bit-identical dictionaries to the in-memory path (all layers together), and
    leaves no store behind once they are saved."""
    import circuit_discovery.sae.training as training
    from circuit_discovery.models import load_model

    groups = []
    real_groups = training._groups
    monkeypatch.setattr(training, "TRAIN_GROUP_BYTES", 1)  # every transcoder its own group
    monkeypatch.setattr(training, "_groups", lambda *a: groups.append(real_groups(*a)) or groups[-1])
    model = load_model("tiny-gemma3", device="cpu")
    extra = {"clt_d_sae": 16} if kind == "clt" else {"layers": [0, 1]}
    mem = _train_kinds(model, tmp_path, "memory", kind, **extra)
    disk = _train_kinds(model, tmp_path, "disk", kind, **extra)
    assert disk.trained == mem.trained and disk.trained
    a, b = mem.transcoder_set, disk.transcoder_set
    if kind == "clt":
        pairs = [(a.cross_layer.W_enc[l], b.cross_layer.W_enc[l]) for l in range(model.cfg.n_layers)]
        pairs += [(a.cross_layer.W_dec[l], b.cross_layer.W_dec[l]) for l in range(model.cfg.n_layers)]
    else:
        pairs = [(getattr(a.per_layer[l], n), getattr(b.per_layer[l], n))
                 for l in (0, 1) for n in ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip", "threshold")]
    assert pairs
    for x, y in pairs:
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert not list((tmp_path / "disk" / "saes").glob("activations/*")), "the store outlived training"
    if kind != "clt":
        assert [len(g) for g in groups[0]] == [1, 1]


def test_a_finished_store_is_reused_and_a_damaged_one_harvested_again(tmp_path, monkeypatch):
    """A store left by a run that stopped during training is read, not harvested again; one whose shard is damaged
    is harvested again (with a warning), and training still gives the same dictionary."""
    from circuit_discovery.models import load_model
    from circuit_discovery.sae import harvest as harvest_mod
    from circuit_discovery.sae.training import train_saes_on_model

    model = load_model("tiny-gemma3", device="cpu")
    texts = ["The capital of France is Paris. The Eiffel Tower is in Paris."] * 12
    cfg = SAETrainConfig("blocks.0.mlp.hook_in", hook_name_out="blocks.0.hook_mlp_out", architecture="topk", k=4,
                         training_tokens=256, train_batch_size_tokens=32)
    kw = dict(corpus_id="c", context_size=16, progress=False, activations="disk", store_dir=tmp_path / "store")
    calls = []
    real = harvest_mod.harvest_to_store
    monkeypatch.setattr(harvest_mod, "harvest_to_store", lambda *a, **k: calls.append(1) or real(*a, **k))

    def boom(*a, **k):
        raise RuntimeError("stopped during training")

    import circuit_discovery.sae.training as training

    real_train = training.train_saes
    monkeypatch.setattr(training, "train_saes", boom)
    with pytest.raises(RuntimeError, match="stopped"):
        train_saes_on_model(model, texts, [cfg], cache_dir=tmp_path / "c1", **kw)
    (folder,) = (tmp_path / "store").iterdir()
    assert (folder / "manifest.json").is_file() and calls == [1]
    monkeypatch.setattr(training, "train_saes", real_train)
    first = train_saes_on_model(model, texts, [cfg], cache_dir=tmp_path / "c2", **kw)[cfg.key]
    assert calls == [1] and not folder.exists()  # read, not harvested again; deleted once saved
    ref = train_saes_on_model(model, texts, [cfg], cache_dir=tmp_path / "c3", **{**kw, "activations": "memory"})
    torch.testing.assert_close(first.sae.W_dec, ref[cfg.key].sae.W_dec, atol=0, rtol=0)
    # a damaged finished store: harvested again
    monkeypatch.setattr(training, "train_saes", boom)
    with pytest.raises(RuntimeError):
        train_saes_on_model(model, texts, [cfg], cache_dir=tmp_path / "c4", **kw)
    (folder,) = (tmp_path / "store").iterdir()
    shard = next(folder.glob("*/00000.safetensors"))
    shard.write_bytes(shard.read_bytes()[:40])
    monkeypatch.setattr(training, "train_saes", real_train)
    again = train_saes_on_model(model, texts, [cfg], cache_dir=tmp_path / "c5", **kw)[cfg.key]
    assert calls == [1, 1, 1]
    torch.testing.assert_close(again.sae.W_dec, ref[cfg.key].sae.W_dec, atol=0, rtol=0)
    with pytest.raises(CircuitDiscoveryError, match="activations="):
        train_saes_on_model(model, texts, [cfg], cache_dir=tmp_path / "c6", **{**kw, "activations": "ram"})
