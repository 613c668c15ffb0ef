"""Distributed runs (``pipeline/distributed.py``, ``Run`` under torchrun): how the work is dealt, the messages
between ranks, the seeding (never by rank or by order), and whole runs with ``torchrun --standalone
--nproc-per-node 2`` (gloo, CPU, 1 thread per rank) on the quick configuration of tiny-gemma3, compared with a
one-process run of the same seed.

Oracle of the whole-run tests: the one-process run's files. ``circuits.json``, ``hypotheses.csv`` and
``metrics.json`` must be byte-identical (``metrics.json`` leaves out ``trained_layers``, whether this run trained the
transcoders or read them from the cache: not a result), ``stages/known.json`` too but for its ``_seconds``, and
``stages/dictionaries.json`` but for its timings (``seconds``, ``_seconds``). Both runs of the comparison start
with a cold cache of their own (``$CIRCUIT_DISCOVERY_CACHE``), so both train the transcoders: the two ranks two
layers each, and the saved weights must be byte-identical. No tolerance is needed: every rank runs each work item's
functions on the same inputs with the same thread count, so the floats are the same.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from circuit_discovery.pipeline.distributed import (
    ENV_KILL,
    ENV_TIMEOUT,
    EXIT_FAILED,
    Dist,
    DistributedError,
    RankStopped,
    share_of,
    timeout_s,
)

MAIN = Path(__file__).resolve().parents[2] / "main.py"
TOML = ('[run]\nmodel = "tiny-gemma3"\nquick = true\nquick_relations = 3\nquick_facts = 4\nquick_held_out = 3\n'
        'known_k = 1000000\nprogress = false\n')
OUTPUTS = ("circuits.json", "metrics.json", "hypotheses.csv")
#: 1 thread per process in every run compared (the floats of a matrix product may depend on the thread count)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: the model and transcoder cache's root (``sae.io.default_cache_dir``): each compared run gets a cold one
CACHE_ENV = "CIRCUIT_DISCOVERY_CACHE"


# ---------------------------------------------------------------------------------------------- the split
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_share_of_deals_every_item_to_exactly_one_rank(world):
    for n in range(12):
        shares = [share_of(n, r, world) for r in range(world)]
        dealt = sorted(i for s in shares for i in s)
        assert dealt == list(range(n))                                 # every item, once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1     # balanced by count
        assert all(s == sorted(s) for s in shares)                    # each rank keeps the run's order


def test_timeout_is_read_and_checked(monkeypatch):
    monkeypatch.setenv(ENV_TIMEOUT, "12.5")
    assert timeout_s() == 12.5
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv(ENV_TIMEOUT, bad)
        with pytest.raises(DistributedError, match=ENV_TIMEOUT):
            timeout_s()


def test_without_torchrun_there_is_no_distributed_context(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert Dist.from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")       # torchrun --nproc-per-node 1: the plain single-process run
    assert Dist.from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    d = Dist.from_env()
    assert d is not None and (d.rank, d.world_size) == (1, 2)


# ---------------------------------------------------------------------------------------------- messages
@pytest.fixture
def one_rank(monkeypatch):
    """A started one-rank gloo group in this process (the message code is the same for any number of ranks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    d = Dist(rank=0, world_size=1, timeout=60)
    sigterm = signal.getsignal(signal.SIGTERM)
    d.start("cpu")
    yield d
    d._failing = False      # a test made the run fail: leave the group and restore SIGTERM all the same
    d.close()
    assert signal.getsignal(signal.SIGTERM) == sigterm


def test_messages_carry_json_exactly(one_rank):
    values = {"third": 1 / 3, "tiny": 5e-324, "big": 1.7976931348623157e308, "neg": -0.0, "text": "é\n\u0000",
              "nested": [1, [2.5, None, True]]}
    got = one_rank.exchange(lambda: values, "test")
    assert got == [values]
    assert json.dumps(got[0]) == json.dumps(values)               # bit-exact floats (repr round trip)
    nan = one_rank.share(lambda: float("nan"), "test")
    assert nan != nan                                             # NaN survives (metrics can hold NaN)
    assert one_rank.peers == [{"host": one_rank.host, "pid": os.getpid()}]


def test_a_failing_rank_stops_the_run_with_one_line_naming_it(one_rank, capsys):
    from circuit_discovery.facts import DatasetError

    def bad_input():
        raise DatasetError("relation 'x' is unknown; use frc relations")

    with pytest.raises(DistributedError, match=r"^rank 0 of 1 failed in stage circuits: relation 'x' is unknown"):
        one_rank.exchange(bad_input, "circuits")

    def bug():
        raise ZeroDivisionError("division by zero")

    with pytest.raises(RankStopped) as e:
        one_rank.share(bug, "validation")
    assert e.value.code == EXIT_FAILED
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert lines == ["error: rank 0 of 1 failed in stage validation: ZeroDivisionError: division by zero (a bug: "
                     "the traceback is in rank 0's log above)"]


def test_an_error_after_the_last_message_is_reported_as_itself_not_as_a_lost_rank(one_rank, capsys, monkeypatch):
    """Rank 0 fails after the other ranks have finished and left (writing config.json after the last exchange):
    its own error is the one line, not "rank N stopped ... without reporting an error"."""
    from circuit_discovery.pipeline import distributed as dist_mod

    def gone(obj):
        raise dist_mod._Lost("RuntimeError: Connection closed by peer")

    monkeypatch.setattr(one_rank, "_all_gather_json", gone)
    with pytest.raises(RankStopped) as e:
        one_rank.fail(PermissionError("config.json: read-only file system"), "report")
    assert e.value.code == EXIT_FAILED
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert lines == ["error: rank 0 of 1 failed in stage report (the other ranks had left or stopped answering): "
                     "PermissionError: config.json: read-only file system (a bug: the traceback is in rank 0's log "
                     "above)"]
    with pytest.raises(DistributedError, match="failed in stage report .*: relation 'x' is unknown"):
        from circuit_discovery.facts import DatasetError

        one_rank.fail(DatasetError("relation 'x' is unknown"), "report")


SLOW_RANK = """
import time
from circuit_discovery.pipeline.distributed import Dist, run_distributed

def body(d):
    if d.rank == 1:
        time.sleep(60)              # a rank that never answers in time
    d.exchange(lambda: 1, "circuits")

run_distributed(body, "cpu")
"""


def test_a_rank_that_does_not_answer_stops_the_run_at_the_timeout(tmp_path):
    """No hang: a rank that waits longer than FRC_DIST_TIMEOUT for the others stops the run with one line."""
    import time

    script = tmp_path / "slow.py"
    script.write_text(SLOW_RANK)
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], capture_output=True, text=True, timeout=300, env={**ENV, ENV_TIMEOUT: "3"})
    assert res.returncode != 0
    assert time.time() - t0 < 55                                   # well before the slow rank would answer
    ours = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(ours) == 1, res.stderr
    assert ours[0].startswith("error: rank 0 stopped waiting for the other ranks during stage circuits")
    assert f"{ENV_TIMEOUT}=3 s" in ours[0]


# ---------------------------------------------------------------------------------------------- seeding
def test_relation_results_do_not_depend_on_order_or_process(tmp_path):
    """Each relation's circuit and validation (matched random circuits, bootstrap) are the same whether it runs
    first or second in a process: no draw depends on what ran before (hence not on the rank either), only on the
    seed and what it is for. A different seed changes the draws, so the comparison can fail."""
    import dataclasses

    from circuit_discovery.facts import load_builtin
    from circuit_discovery.models import load_model
    from circuit_discovery.pipeline import RunConfig
    from circuit_discovery.pipeline.attribution_stage import pairs_by_relation
    from circuit_discovery.pipeline.circuit_stage import circuit_for_relation, validate_relation

    cfg = RunConfig(model="tiny-gemma3", quick=True, quick_facts=4, quick_held_out=3, n_random=19, progress=False,
                    device="cpu", circuit_search="eap", min_metric_gap=0.0)  # no gap rule: the random draws run
    model = load_model("tiny-gemma3", device="cpu")
    ds = load_builtin(["capital_city", "city_country"])
    pairs, _ = pairs_by_relation(model, {rel: list(ds[rel]) for rel in ds.relation_names}, cfg)
    assert len(pairs) == 2

    def results(order, c=cfg):
        out = {}
        for rel in order:
            found = circuit_for_relation(model, rel, pairs[rel], c)
            out[rel] = json.dumps([found, validate_relation(model, pairs[rel], found, c)], sort_keys=True)
        return out

    forward, backward = results(list(pairs)), results(list(pairs)[::-1])
    assert forward == backward
    assert all('"random_draws": 19' in v for v in forward.values())   # the matched random circuits were drawn
    other = results(list(pairs)[:1], dataclasses.replace(cfg, seed=1))
    rel = list(pairs)[0]
    assert other[rel] != forward[rel]


# ---------------------------------------------------------------------------------------------- whole runs
def _torchrun(*args, extra_env=None, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(MAIN), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**ENV, **(extra_env or {})})


def _outputs(folder: Path) -> dict[str, str]:
    out = {f: (folder / f).read_text() for f in OUTPUTS}
    metrics = json.loads(out["metrics.json"])
    assert "trained_layers" not in metrics["dictionaries"]   # config.json's business: metrics.json has results only
    known = json.loads((folder / "stages" / "known.json").read_text())
    assert known.pop("_seconds") >= 0                        # the stage's wall time: the one field that may differ
    out["stages/known.json"] = json.dumps(known)
    return out


def _dictionaries(folder: Path) -> dict:
    """``stages/dictionaries.json`` without its timings (``seconds``, ``_seconds``)."""
    data = json.loads((folder / "stages" / "dictionaries.json").read_text())
    assert data.pop("_seconds") >= 0 and data.pop("seconds") >= 0
    return data


def _weights(cache: Path) -> dict[str, bytes]:
    """The transcoders' weight files in a cache, by cache key (model, hook, training config and corpus)."""
    return {p.parent.name: p.read_bytes() for p in (cache / "saes").glob("*/sae_weights.safetensors")}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "run.toml"
    path.write_text(TOML)
    return path


@pytest.fixture(scope="module")
def reference(config):
    """The one-process run (no torchrun; in this process, which runs 1 thread) of the configuration, with a cold
    cache of its own (``cache_one``: it samples the corpus and trains the transcoders)."""
    from circuit_discovery.pipeline import RunConfig, run_pipeline

    assert "WORLD_SIZE" not in os.environ
    out = config.parent / "one"
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(config.parent / "cache_one")
    try:
        run_pipeline(RunConfig.from_toml(config, out=str(out)))
    finally:
        if old is None:
            del os.environ[CACHE_ENV]
        else:
            os.environ[CACHE_ENV] = old
    return out


def test_two_processes_write_what_one_process_writes(config, reference):
    out, cache = config.parent / "two", config.parent / "cache_two"
    res = _torchrun("--config", str(config), "--out", str(out), extra_env={CACHE_ENV: str(cache)})   # cold cache
    assert res.returncode == 0, res.stderr
    assert _outputs(out) == _outputs(reference)
    n_layers = 4                                                  # tiny-gemma3: one transcoder per layer
    assert _dictionaries(out) == _dictionaries(reference)
    assert _dictionaries(out)["trained_layers"] == list(range(n_layers))   # trained by the ranks, not read
    weights = _weights(cache)
    assert len(weights) == n_layers and weights == _weights(config.parent / "cache_one")
    one, two = (json.loads((d / "config.json").read_text()) for d in (reference, out))
    assert (one["world_size"], one["ranks"]) == (1, [])
    assert not (reference / "stages" / "circuits").exists()      # the one-process run takes the plain path
    assert two["world_size"] == 2 and [r["rank"] for r in two["ranks"]] == [0, 1]
    rels = list(json.loads((reference / "stages" / "circuits.json").read_text())["relations"])
    assert len(rels) == 3
    for stage in ("attribution", "circuits", "validation", "feature_circuits"):
        items = [r["stages"][stage]["items"] for r in two["ranks"]]
        assert items == [rels[0::2], rels[1::2]], stage           # round robin: both ranks worked
    n_facts = json.loads((reference / "stages" / "known.json").read_text())["n"]
    assert n_facts > 64                                           # two batches of facts (64 each at most)
    assert [r["stages"]["known"]["items"] for r in two["ranks"]] == [["facts 0-63"], [f"facts 64-{n_facts - 1}"]]
    layers = [[r["stages"]["dictionaries"][k] for k in ("items", "resumed")] for r in two["ranks"]]
    assert layers == [[["layer 0", "layer 2"], []], [["layer 1", "layer 3"], []]]


def test_killed_rank_stops_the_run_and_resume_finishes_it(config, reference):
    """Rank 0 (which writes the outputs) is killed with SIGKILL in the circuits stage after its first relation:
    rank 1 reports it in one line; the same torchrun command with --resume reads the finished relations' checkpoints
    and writes the one-process run's files."""
    out = config.parent / "killed"
    args = ("--config", str(config), "--out", str(out))
    res = _torchrun(*args, extra_env={ENV_KILL: "circuits:0:1"})   # rank 0 SIGKILLs itself before its 2nd relation
    assert res.returncode != 0
    ours = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(ours) == 1, res.stderr
    assert ours[0].startswith("error: rank 0 (pid ") and "stage circuits" in ours[0] and "--resume" in ours[0]
    assert not (out / "circuits.json").exists() and not (out / "stages" / "circuits.json").exists()
    assert len(list((out / "stages" / "circuits").glob("*.json"))) >= 1   # the checkpoints of finished relations

    res = _torchrun(*args, "--resume")
    assert res.returncode == 0, res.stderr
    assert _outputs(out) == _outputs(reference)
    ranks = json.loads((out / "config.json").read_text())["ranks"]
    rels = list(json.loads((reference / "stages" / "circuits.json").read_text())["relations"])
    circuits = ranks[0]["stages"]["circuits"]
    assert (circuits["items"], circuits["resumed"]) == ([rels[2]], [rels[0]])
    assert "attribution" not in ranks[0]["stages"]                # finished stages are read, not recomputed


def test_bad_input_stops_every_rank_with_one_line(tmp_path):
    res = _torchrun("--model", "tiny-gemma3", "--relations", "no_such_relation", "--out", str(tmp_path / "x"),
                    timeout=300)
    assert res.returncode != 0
    ours = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(ours) == 1, res.stderr
    assert ours[0].startswith("error: rank 0 of 2 failed in stage start (ranks 1 failed too): ")
    assert "no_such_relation" in ours[0]
