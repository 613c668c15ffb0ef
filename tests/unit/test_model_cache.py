"""The model cache: fast folder loading equals ``from_pretrained``; the manifest's hashes catch a same-size
corruption; an untouched file is not rehashed. A tiny model stands in for the GGUF build (``BuiltinModel.build``)."""
import contextlib
import json
import os

import pytest
import torch

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.models import cache as cache_mod
from circuit_discovery.models import loading
from circuit_discovery.models.cache import ModelCacheError, check_cache
from circuit_discovery.models.fastload import load_folder
from circuit_discovery.models.loading import verify_model_cache

TINY = ("tiny-gpt2", "tiny-gemma", "tiny-gemma2", "tiny-gemma3", "tiny-llama")
NAME = "test-tiny-cache"
TEXTS = ["The Eiffel Tower is located in the city of", " Paris", "Hello  world\n\nfoo  ", "1789 ünï 東京 <bos>x"]


def _save_tiny(name, folder):
    model, tok = loading.build_tiny(name)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


@pytest.mark.parametrize("name", TINY)
def test_fast_load_equals_from_pretrained(tmp_path, name):
    """Oracle: transformers' own from_pretrained on the same folder (weights, buffers, logits, tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _save_tiny(name, tmp_path)
    fast_model, fast_tok = load_folder(tmp_path, torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(tmp_path)
    a, b = fast_model.state_dict(), ref_model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(fast_model.buffers(), ref_model.buffers()))
    assert fast_model.config._attn_implementation == ref_model.config._attn_implementation
    assert not fast_model.training
    assert all(p.requires_grad for p in fast_model.parameters())
    emb, head = fast_model.get_input_embeddings().weight, fast_model.get_output_embeddings().weight
    ref_tied = ref_model.get_input_embeddings().weight is ref_model.get_output_embeddings().weight
    assert (emb is head) == ref_tied
    ids = ref_tok(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(fast_model(ids).logits, ref_model(ids).logits)
    assert fast_tok.backend_tokenizer.to_str() == ref_tok.backend_tokenizer.to_str()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "padding_side",
                 "clean_up_tokenization_spaces"):
        assert getattr(fast_tok, attr) == getattr(ref_tok, attr), attr
    for text in TEXTS:
        ids = ref_tok(text, add_special_tokens=False)["input_ids"]
        assert fast_tok(text, add_special_tokens=False)["input_ids"] == ids
        enc = ref_tok.encode(text, add_special_tokens=False)
        assert fast_tok.decode(enc) == ref_tok.decode(enc)


def test_in_place_edit_never_reaches_the_cached_file(tmp_path):
    """The weights are memory-mapped copy-on-write: an in-place edit changes the model, not the file."""
    _save_tiny("tiny-gemma3", tmp_path)
    before = cache_mod.sha256_file(tmp_path / "model.safetensors")
    model, _ = load_folder(tmp_path, torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert cache_mod.sha256_file(tmp_path / "model.safetensors") == before


@pytest.fixture
def fake_builtin(monkeypatch):
    """A built-in model whose 'GGUF build' saves tiny-gemma3; counts builds."""
    builds = []

    def build(folder):
        builds.append(folder)
        _save_tiny("tiny-gemma3", folder)
        return "tiny-gemma3 (test)"

    monkeypatch.setitem(loading.BUILTIN_MODELS, NAME,
                        loading.BuiltinModel(NAME, "test", lambda: None, ("Gemma3ForCausalLM",), build=build))
    return builds


def _hash_spy(monkeypatch):
    calls = []
    real = cache_mod.sha256_file

    def spy(path):
        calls.append(os.path.basename(path))
        return real(path)
    monkeypatch.setattr(cache_mod, "sha256_file", spy)
    return calls


def _zero_middle(path, n=4096):
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(b"\0" * n)
    assert path.stat().st_size == size  # same size: a size check alone cannot see it


def _same_weights_as_built(m):
    """Oracle: the weights build_tiny makes (what the fake build saved), compared exactly."""
    ref = loading.build_tiny("tiny-gemma3")[0].state_dict()
    got = m.hf_model.state_dict()
    return got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_same_size_corruption_is_detected_and_rebuilt(tmp_path, fake_builtin, monkeypatch):
    m = loading.load_model(NAME, device="cpu", cache_dir=tmp_path)
    assert len(fake_builtin) == 1
    folder = tmp_path / "models" / NAME
    manifest = json.loads((folder / "frc_manifest.json").read_text())
    assert set(manifest["sha256_files"]) == set(manifest["files"]) == set(manifest["verified"])
    assert _same_weights_as_built(m)

    _zero_middle(folder / "model.safetensors")
    chk = check_cache(folder)
    assert not chk.ok and "model.safetensors does not match its SHA-256" in chk.problems[0]
    report = verify_model_cache(NAME, cache_dir=tmp_path)
    assert report["ok"] is False and report["models"][NAME]["status"] == "damaged"
    assert "rebuild" in report["models"][NAME]["fix"]

    m2 = loading.load_model(NAME, device="cpu", cache_dir=tmp_path)  # detected and rebuilt
    assert len(fake_builtin) == 2
    assert _same_weights_as_built(m2)
    assert verify_model_cache(NAME, cache_dir=tmp_path)["ok"] is True


def test_untouched_cache_is_not_rehashed(tmp_path, fake_builtin, monkeypatch):
    loading.load_model(NAME, device="cpu", cache_dir=tmp_path)
    calls = _hash_spy(monkeypatch)
    loading.load_model(NAME, device="cpu", cache_dir=tmp_path)
    assert calls == [] and len(fake_builtin) == 1  # the fast path: stamps match, nothing read
    full = verify_model_cache(NAME, cache_dir=tmp_path)  # the full check reads every file
    assert full["ok"] and sorted(calls) == sorted(full["models"][NAME]["rehashed"]) and "model.safetensors" in calls


def test_rewrite_with_restored_mtime_is_still_rehashed(tmp_path, fake_builtin):
    """A same-size write whose mtime is put back still changes ctime: the file is rehashed and the damage found."""
    loading.load_model(NAME, device="cpu", cache_dir=tmp_path)
    path = tmp_path / "models" / NAME / "tokenizer.json"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    with open(path, "r+b") as fh:  # in place: the same inode
        fh.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    chk = check_cache(tmp_path / "models" / NAME)
    assert not chk.ok and "tokenizer.json" in chk.rehashed
    assert any("tokenizer.json does not match" in p for p in chk.problems)


def test_old_manifest_gets_hashes_and_stamps(tmp_path, fake_builtin, monkeypatch):
    """A manifest from before per-file hashes (weights hash only): the first check hashes everything once and
    records it; the next one reads nothing."""
    loading.load_model(NAME, device="cpu", cache_dir=tmp_path)
    folder = tmp_path / "models" / NAME
    meta = json.loads((folder / "frc_manifest.json").read_text())
    for key in ("sha256_files", "verified"):
        del meta[key]
    (folder / "frc_manifest.json").write_text(json.dumps(meta))
    calls = _hash_spy(monkeypatch)
    assert check_cache(folder).ok
    assert sorted(calls) == sorted(meta["files"])
    calls.clear()
    assert check_cache(folder).ok and calls == []


def test_size_change_and_missing_manifest_are_damage(tmp_path, fake_builtin):
    loading.load_model(NAME, device="cpu", cache_dir=tmp_path)
    folder = tmp_path / "models" / NAME
    with open(folder / "config.json", "a") as fh:
        fh.write(" ")
    assert any("config.json has" in p for p in check_cache(folder).problems)
    (folder / "frc_manifest.json").unlink()
    assert check_cache(folder).problems == ["frc_manifest.json is missing or unreadable"]


def test_verify_model_cache_names_and_errors(tmp_path, fake_builtin):
    with pytest.raises(ModelCacheError, match="not a built-in model"):
        verify_model_cache("no-such-model", cache_dir=tmp_path)
    assert issubclass(ModelCacheError, CircuitDiscoveryError)
    assert verify_model_cache(cache_dir=tmp_path) == {"cache_dir": str(tmp_path), "ok": True, "models": {}}
    assert verify_model_cache(NAME, cache_dir=tmp_path)["models"][NAME]["status"] == "absent"
    loading.load_model(NAME, device="cpu", cache_dir=tmp_path)
    every = verify_model_cache(cache_dir=tmp_path)
    assert list(every["models"]) == [NAME] and every["ok"]


def test_concurrent_processes_build_a_damaged_cache_once(tmp_path, fake_builtin, monkeypatch):
    """Ranks of a torchrun run share the cache: two loads that find it damaged at the same time build it once (the
    second waits on the folder's lock, then finds it built); without the lock both build (the control)."""
    import threading
    import time as _time

    def slow_build(folder, real=loading.BUILTIN_MODELS[NAME].build):
        _time.sleep(0.5)
        return real(folder)

    monkeypatch.setitem(loading.BUILTIN_MODELS, NAME, loading.BuiltinModel(NAME, "test", lambda: None,
                                                                             ("Gemma3ForCausalLM",), build=slow_build))

    def race(cache):
        errors = []

        def one():
            try:
                loading.builtin_folder(NAME, cache)
            except Exception as e:  # noqa: BLE001 -- reported by the assertion below
                errors.append(e)

        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return errors

    assert race(tmp_path / "locked") == []
    assert len(fake_builtin) == 1
    monkeypatch.setattr(loading, "_cache_lock", lambda folder: contextlib.nullcontext())
    race(tmp_path / "unlocked")
    assert len(fake_builtin) == 3  # the control: without the lock both threads build
