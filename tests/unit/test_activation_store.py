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
