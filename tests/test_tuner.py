"""The autotuner on CPU: keys and buckets, cache lookup and fallbacks, robustness of the JSON files
(foreign headers, corruption, wrong types, concurrent writers) and tune() with fake run/bench."""
import dataclasses
import json
import multiprocessing
import sys
import warnings

import pytest
import torch

from gsa_compile import tuner, tuning_search
from gsa_compile.spec import GateLayout, Spec, TileConfig
from gsa_compile.tuner import DEFAULT_CONFIG, Environment, LaunchConfig, TuningCache, TuningKey

ENV = Environment(gpu="NVIDIA H200", capability="9.0", triton="3.7.1", torch="2.13.0", source_hash="abc123")
SPEC = Spec(layout=GateLayout.SLOT, chunk_size=64, dtype="bfloat16", K=128, V=128, M=64, group=2)


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Shipped and user directories under tmp_path (env vars too: nothing touches the real home)."""
    shipped, cache = tmp_path / "autotune", tmp_path / "cache"
    shipped.mkdir()
    monkeypatch.setenv("GSA_COMPILE_TUNING_DIR", str(shipped))
    monkeypatch.setenv("GSA_COMPILE_CACHE_DIR", str(cache))
    return shipped, cache / "tuning"


def key(T=4096, BH=64, **kw):
    return dataclasses.replace(TuningKey.make(SPEC, T=T, BH=BH), **kw)


def write(path, entries, env=ENV, **top):
    doc = {"format": tuner.FORMAT, "version": tuner.SCHEMA_VERSION, "header": dataclasses.asdict(env),
           "entries": {k.to_str(): {"config": c.to_json(), "time_ms": 1.0, "default_ms": 2.0,
                                    **({"kernel_hash": tuner.backward_source_hash()} if k.direction == "backward" else {})}
                       for k, c in entries}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**doc, **top}))


def caught(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        result = fn()
    return result, [x for x in w if "gsa_compile tuning file" in str(x.message)]


FAST = LaunchConfig(chunk_size=128, BK=64, BV=128, num_warps=8, num_stages=3)
OTHER = LaunchConfig(chunk_size=32, BK=32, BV=32, num_warps=4, num_stages=1)


# -- keys and search space ---------------------------------------------------------------------

def test_buckets():
    assert [tuner.bucket(t, *tuner.T_RANGE) for t in (1, 256, 257, 4096, 5000, 1 << 21)] == \
        [256, 256, 512, 4096, 8192, 1 << 20]
    assert [tuner.bucket(b, *tuner.BH_RANGE) for b in (1, 3, 64, 65, 10**6)] == [1, 4, 64, 128, 4096]
    k = TuningKey.make(SPEC, T=3000, BH=2 * 12)
    assert (k.layout, k.dtype, k.K, k.group, k.varlen, k.T, k.BH) == ("slot", "bfloat16", 128, 2, False, 4096, 32)
    assert TuningKey.from_str(k.to_str()) == k
    assert TuningKey.make(SPEC, T=3000, BH=24) == TuningKey.make(SPEC, T=2049, BH=17)  # same buckets
    for bad in ("", "slot|bfloat16", k.to_str().replace("T=4096", "T=4000"), k.to_str().replace("slot", "x"), 7):
        with pytest.raises(ValueError):
            TuningKey.from_str(bad)


def test_search_space_and_prune():
    space = tuning_search.search_space(SPEC)
    assert space[0] == DEFAULT_CONFIG and len(space) == len(set(space)) == 3 * 3 * 2 * 3
    small = tuning_search.search_space(Spec(layout=GateLayout.SLOT, chunk_size=64, dtype="float32", K=24, V=16, M=8))
    assert {c.BK for c in small} == {32} and {c.BV for c in small} == {16} and small[0].BK == 32
    assert len(small) == 3 * 2 * 3

    def fits(c):
        if c.num_stages == 3:
            raise RuntimeError("cannot compile")
        return c.chunk_size * c.BV <= 64 * 64
    kept = tuning_search.prune(space, fits)
    assert kept and all(c.num_stages < 3 and c.chunk_size * c.BV <= 4096 for c in kept)


def test_footprint_fits_memoises():
    calls = []

    def footprint(builder, spec, constexprs, tile, arch):
        calls.append((builder.__name__, tile.num_stages))
        return type("F", (), {"fits": tile.num_stages < 3})()

    def state_pass(): ...
    fits = tuning_search.footprint_fits(lambda c: [(state_pass, SPEC, {"BK": c.BK})], footprint=footprint)
    assert fits(DEFAULT_CONFIG) and fits(DEFAULT_CONFIG)
    assert not fits(dataclasses.replace(DEFAULT_CONFIG, num_stages=3))
    assert calls == [("state_pass", 2), ("state_pass", 3)]


# -- lookup ------------------------------------------------------------------------------------

def test_lookup_exact_nearest_default(dirs):
    shipped, user = dirs
    write(shipped / "NVIDIA_H200.json", [(key(), FAST), (key(T=1 << 16, BH=4096), OTHER)])
    cache = TuningCache(ENV)
    assert cache.shipped_path == shipped / "NVIDIA_H200.json" and cache.user_path == user / "NVIDIA_H200.json"
    assert cache.lookup(key()) == (FAST, "exact")
    assert cache.lookup(key(T=8192)) == (FAST, "nearest")
    assert cache.lookup(key(T=1 << 15, BH=2048)) == (OTHER, "nearest")
    assert cache.lookup(key(T=1 << 18, BH=1024)) == (OTHER, "nearest")  # log2 distances 10 vs 4
    assert cache.lookup(key(T=1 << 18, BH=64)) == (FAST, "nearest")  # 6 vs 8
    assert cache.lookup(key(T=1 << 14, BH=512)) == (OTHER, "nearest")  # 5 vs 5: the larger T wins
    assert cache.lookup(key(T=1 << 18, BH=1024), max_distance=2) == (DEFAULT_CONFIG, "default")
    assert cache.lookup(key(M=32)) == (DEFAULT_CONFIG, "default")  # other shapes never borrow
    assert cache.lookup(key(varlen=True)) == (DEFAULT_CONFIG, "default")
    small = TuningKey.make(Spec(layout=GateLayout.HEAD, chunk_size=64, dtype="float32", K=16, V=32, M=8), 64, 1)
    assert cache.lookup(small) == (LaunchConfig(chunk_size=64, BK=16, BV=32, num_warps=4, num_stages=2), "default")  # default clamped to K, V
    # the user file wins over the shipped one; record() refreshes the memo
    assert cache.record(key(), OTHER, time_ms=0.5, default_ms=1.0)
    assert cache.lookup(key()) == (OTHER, "exact")
    assert TuningCache(ENV).lookup(key()) == (OTHER, "exact")
    doc = json.loads(cache.user_path.read_text())
    assert doc["header"] == dataclasses.asdict(ENV)
    assert doc["entries"][key().to_str()]["config"] == OTHER.to_json()
    assert doc["entries"][key().to_str()]["speedup"] == 2.0


def test_backward_entries(dirs):
    """Backward keys: their own entries (text of forward keys unchanged), never borrowed across directions."""
    shipped, _ = dirs
    back = key(direction="backward")
    assert TuningKey.from_str(back.to_str()) == back and back.to_str().endswith("|direction=backward")
    assert "direction" not in key().to_str() and TuningKey.from_str(key().to_str()) == key()
    with pytest.raises(ValueError):
        TuningKey.from_str(key().to_str() + "|direction=sideways")
    write(shipped / "NVIDIA_H200.json", [(key(), FAST), (back, OTHER)])
    cache = TuningCache(ENV)
    assert cache.lookup(key()) == (FAST, "exact") and cache.lookup(back) == (OTHER, "exact")
    assert cache.lookup(key(T=8192, direction="backward")) == (OTHER, "nearest")
    write(shipped / "NVIDIA_H200.json", [(key(), FAST)])
    assert TuningCache(ENV).lookup(back) == (DEFAULT_CONFIG, "default")


def test_older_backward_entries_follow_the_backward_sources(dirs, monkeypatch):
    """An entry written before kernel_text_hash: a backward one carries the hash of the backward's kernel
    sources and is ignored once they change (one warning) while the forward's entries stay; record()
    stamps the text hash of the kernels it tuned."""
    shipped, _ = dirs
    back = key(direction="backward")
    write(shipped / "NVIDIA_H200.json", [(key(), FAST), (back, OTHER)])
    assert TuningCache(ENV).lookup(back) == (OTHER, "exact")
    monkeypatch.setattr(tuner, "backward_source_hash", lambda: "0123456789abcdef")  # the backward kernels changed
    (fwd, back_found), problems = caught(lambda: (TuningCache(ENV).lookup(key()), TuningCache(ENV).lookup(back)))
    assert fwd == (FAST, "exact") and back_found == (DEFAULT_CONFIG, "default")
    assert len(problems) == 1 and "1 backward) tuned for other kernels" in str(problems[0].message)
    cache = TuningCache(ENV)
    assert cache.record(back, FAST, 1.0, 2.0, shipped=True)
    doc = json.loads((shipped / "NVIDIA_H200.json").read_text())
    assert doc["entries"][back.to_str()]["kernel_text_hash"] == tuner.kernel_text_hash(back, FAST.chunk_size)
    assert doc["entries"][key().to_str()]["kernel_text_hash"] == tuner.kernel_text_hash(key(), FAST.chunk_size)
    assert cache.lookup(back) == (FAST, "exact")


def test_entries_follow_the_generated_kernel_text(dirs, monkeypatch):
    """Entries stamped with kernel_text_hash hold under other package sources (another header
    source_hash) while their kernels' text is unchanged, and only those whose text changed are ignored."""
    from gsa_compile import codegen
    shipped, _ = dirs
    fp16 = key(dtype="float16")
    path = shipped / "NVIDIA_H200.json"
    assert TuningCache(ENV).record(key(), FAST, 1.0, 2.0, shipped=True)
    assert TuningCache(ENV).record(fp16, FAST, 1.0, 2.0, shipped=True)
    changed = dataclasses.replace(ENV, source_hash="fedcba9876543210")  # a later package: other sources
    assert [TuningCache(changed).lookup(k) for k in (key(), fp16)] == [(FAST, "exact")] * 2
    real = codegen.source
    monkeypatch.setattr(codegen, "source", lambda builder, spec: real(builder, spec) + (
        "# fp16 changed\n" if spec.dtype == "float16" else ""))
    tuner._kernel_text_hash.cache_clear()
    try:
        found, problems = caught(lambda: [TuningCache(changed).lookup(k) for k in (key(), fp16)])
        assert found == [(FAST, "exact"), (DEFAULT_CONFIG, "default")]
        assert len(problems) == 1 and "1 forward) tuned for other kernels" in str(problems[0].message)
        assert json.loads(path.read_text())["header"]["source_hash"] == ENV.source_hash
    finally:
        tuner._kernel_text_hash.cache_clear()


def test_backward_entries_hash_only_the_kernels_a_backward_runs(monkeypatch):
    """A backward entry's kernel_text_hash covers the gate and state passes it recomputes and the backward
    programs, not the output pass (which a backward call never launches): a change to the output pass's
    text makes the forward entries stale and keeps the backward ones."""
    from gsa_compile import codegen, programs, programs_backward
    back = key(direction="backward")
    before = {k: tuner.kernel_text_hash(k, 32) for k in (key(), back)}
    real = codegen.source
    for changed, stale in ((programs.output_pass, {key()}), (programs.state_pass, {key(), back}),
                           (programs_backward.key_backward, {back})):
        monkeypatch.setattr(codegen, "source", lambda builder, spec, changed=changed: real(builder, spec) + (
            "# changed\n" if builder is changed else ""))
        tuner._kernel_text_hash.cache_clear()
        try:
            assert {k for k in before if tuner.kernel_text_hash(k, 32) != before[k]} == stale, changed.__name__
        finally:
            tuner._kernel_text_hash.cache_clear()


def test_backward_launch_takes_its_entry(dirs):
    """launch.Call for a backward with chunk_size AUTO: the backward entry (its warps for the slot backward
    too), else the forward's config with the slot backward at >= 8 warps."""
    from gsa_compile import launch
    shipped, _ = dirs
    env = tuner.current_environment("cpu")
    B, T, H, K, V, M = 1, 300, 2, 32, 32, 16
    q, k, v, s = torch.zeros(B, T, H, K), torch.zeros(B, T, H, K), torch.zeros(B, T, H, V), torch.zeros(B, T, H, M)
    spec = Spec(layout=GateLayout.SLOT, chunk_size=64, dtype="float32", K=K, V=V, M=M)
    forward_key, backward_key = (TuningKey.make(spec, T=T, BH=B * H, direction=d) for d in ("forward", "backward"))
    forward_cfg = LaunchConfig(chunk_size=32, BK=32, BV=32, num_warps=4, num_stages=2)
    backward_cfg = LaunchConfig(chunk_size=16, BK=16, BV=16, num_warps=4, num_stages=1)

    def call(direction):
        tuner._by_setting.clear()  # the files changed under the same setting
        tuner._caches.clear()
        c = launch.Call(q, k, v, s, None, None, launch.AUTO, GateLayout.SLOT, None, lambda kernel: kernel,
                        direction=direction)
        return c.spec.chunk_size, c.consts["slot_backward"]["BK"], c.launch_of["slot_backward"]["num_warps"]

    path = shipped / tuner.gpu_file_name(env.gpu)
    write(path, [(forward_key, forward_cfg)], env=env)
    assert call("forward") == (32, 32, 8) and call("backward") == (32, 32, 8)  # no backward entry: the forward's
    write(path, [(forward_key, forward_cfg), (backward_key, backward_cfg)], env=env)
    assert call("forward") == (32, 32, 8) and call("backward") == (16, 16, 4)
    # a tuned register cap of the key backward reaches its launch, and only its launch
    capped = dataclasses.replace(backward_cfg, key_maxnreg=128)
    assert LaunchConfig.from_json(capped.to_json()) == capped and "key_maxnreg" not in backward_cfg.to_json()
    write(path, [(forward_key, forward_cfg), (backward_key, capped)], env=env)
    tuner._by_setting.clear()
    tuner._caches.clear()
    c = launch.Call(q, k, v, s, None, None, launch.AUTO, GateLayout.SLOT, None, lambda kernel: kernel,
                    direction="backward")
    assert c.launch_of["key_backward"] == dict(c.launch, maxnreg=128)
    assert all("maxnreg" not in c.launch_of.get(name, c.launch) for name in c.consts if name != "key_backward")



def test_eager_call_plans_follow_records_and_overrides(dirs, monkeypatch):
    """launch.Call memoises an eager call's launch plan (host time); a record() into the tuning cache and the
    launch-override variables still take effect at the next call."""
    from gsa_compile import launch, overrides
    B, T, H, K, V, M = 1, 300, 2, 32, 32, 16
    q, k, v, s = (torch.zeros(B, T, H, d) for d in (K, K, V, M))

    def chunk_size():
        return launch.Call(q, k, v, s, None, None, launch.AUTO, GateLayout.SLOT, None, lambda kernel: kernel).spec.chunk_size

    assert chunk_size() == chunk_size() == DEFAULT_CONFIG.chunk_size  # nothing tuned in these directories
    spec = Spec(layout=GateLayout.SLOT, chunk_size=64, dtype="float32", K=K, V=V, M=M)
    assert tuner.default_cache("cpu").record(TuningKey.make(spec, T=T, BH=B * H), OTHER, time_ms=1.0, default_ms=2.0)
    assert chunk_size() == OTHER.chunk_size != DEFAULT_CONFIG.chunk_size
    monkeypatch.setenv(overrides.FORWARD_CONFIG_ENV, "16,32,32,4,1")
    assert chunk_size() == 16
    monkeypatch.delenv(overrides.FORWARD_CONFIG_ENV)
    assert chunk_size() == OTHER.chunk_size

def test_missing_files_and_default_cache(dirs):
    (cfg, source), warned = caught(lambda: TuningCache(ENV).lookup(key()))
    assert (cfg, source) == (DEFAULT_CONFIG, "default") and not warned
    cache = tuner.default_cache()
    assert cache is tuner.default_cache() and cache.user_path.parent == dirs[1]
    assert cache.env.source_hash == tuner.source_hash() and len(tuner.source_hash()) == 16


# -- robustness of the files -------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("gpu", "NVIDIA A100-SXM4-80GB"), ("capability", "8.0"),
                                         ("triton", "3.6.0"), ("torch", "2.11.0"), ("source_hash", "ffff")])
def test_foreign_header_ignored_with_one_warning(dirs, field, value):
    path = dirs[0] / "NVIDIA_H200.json"
    write(path, [(key(), FAST)], env=dataclasses.replace(ENV, **{field: value}))
    results, warned = caught(lambda: [TuningCache(ENV).lookup(key()) for _ in range(3)])
    assert results == [(DEFAULT_CONFIG, "default")] * 3
    assert len(warned) == 1 and value in str(warned[0].message)


@pytest.mark.parametrize("text", [
    "", "{", "not json at all", "[1, 2, 3]", "null", '{"format": "other", "entries": {}}',
    json.dumps({"format": tuner.FORMAT, "version": 99, "header": dataclasses.asdict(ENV), "entries": {}}),
    json.dumps({"format": tuner.FORMAT, "version": 1, "header": None, "entries": {}}),
    json.dumps({"format": tuner.FORMAT, "version": 1, "header": dataclasses.asdict(ENV), "entries": []}),
    "truncated", "binary"])
def test_corrupted_files_ignored(dirs, text):
    path = dirs[1] / "NVIDIA_H200.json"
    if text == "truncated":
        write(path, [(key(), FAST), (key(T=512), OTHER)])
        text = path.read_text()[: len(path.read_text()) // 2]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xfe\x00garbage" if text == "binary" else text.encode())
    write(dirs[0] / "NVIDIA_H200.json", [(key(), OTHER)])  # a valid shipped file still counts
    cache = TuningCache(ENV)
    result, warned = caught(lambda: cache.lookup(key()))
    assert result == (OTHER, "exact") and len(warned) == 1
    assert cache.record(key(T=512), FAST, 1.0, 1.0)  # a broken user file is replaced, not merged
    assert json.loads(path.read_text())["entries"].keys() == {key(T=512).to_str()}


def test_wrong_typed_entries_ignored(dirs):
    path = dirs[0] / "NVIDIA_H200.json"
    write(path, [(key(), FAST)])
    doc = json.loads(path.read_text())
    good = doc["entries"][key().to_str()]
    doc["entries"].update({
        key(T=512).to_str(): {**good, "config": {**FAST.to_json(), "BK": "64"}},
        key(T=1024).to_str(): {**good, "config": {**FAST.to_json(), "num_warps": 4.0}},
        key(T=2048).to_str(): {**good, "config": {**FAST.to_json(), "BV": 48}},
        key(T=8192).to_str(): {**good, "config": {**FAST.to_json(), "chunk_size": True}},
        key(T=16384).to_str(): {**good, "config": [64, 64, 64, 4, 2]},
        key(T=32768).to_str(): {**good, "time_ms": "fast"},
        key(T=65536).to_str(): "oops",
        key(T=1 << 17).to_str(): {**good, "config": {**FAST.to_json(), "extra": 1}},
        key(T=1 << 18).to_str(): {**good, "config": {**FAST.to_json(), "key_maxnreg": 7}},
        key(T=1 << 19).to_str(): {**good, "config": {n: x for n, x in FAST.to_json().items() if n != "BK"}},
        "slot|bfloat16|K=128": good,
        key().to_str().replace("BH=64", "BH=-1"): good,
    })
    path.write_text(json.dumps(doc))
    cache = TuningCache(ENV)
    entries, warned = caught(cache.entries)
    assert list(entries) == [key()] and len(warned) == 1 and "12 malformed" in str(warned[0].message)
    assert cache.lookup(key(T=512)) == (FAST, "nearest")  # the good entry, never a malformed one


def _record_many(user_dir, worker, start, n):
    start.wait()
    cache = TuningCache(ENV, user=user_dir)
    for i in range(n):
        assert cache.record(key(T=256 << (i % 13), BH=1 << worker, M=i + 1), FAST, time_ms=1.0 + i, default_ms=2.0)


def test_concurrent_writers(dirs):
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_record_many, args=(dirs[1], w, start, 20)) for w in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    path = dirs[1] / "NVIDIA_H200.json"
    doc = json.loads(path.read_text())
    assert len(doc["entries"]) == 80
    entries, warned = caught(TuningCache(ENV).entries)
    assert len(entries) == 80 and not warned
    assert sorted(p.name for p in dirs[1].iterdir()) == ["NVIDIA_H200.json", "NVIDIA_H200.json.lock"]


def test_unwritable_directory_warns(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = TuningCache(ENV, shipped=tmp_path, user=blocker / "sub")
    with pytest.warns(RuntimeWarning, match="cannot write"):
        assert cache.record(key(), FAST) is False


# -- tune --------------------------------------------------------------------------------------

TIMES = {DEFAULT_CONFIG: 2.0, FAST: 1.0, OTHER: 1.5}
WRONG = LaunchConfig(chunk_size=32, BK=128, BV=128, num_warps=8, num_stages=1)
BROKEN = LaunchConfig(chunk_size=128, BK=32, BV=32, num_warps=8, num_stages=3)
NAN = LaunchConfig(chunk_size=128, BK=32, BV=32, num_warps=4, num_stages=1)


def fake_run(x, log):
    def run(cfg):
        log.append(cfg)
        if cfg == BROKEN:
            raise RuntimeError("OutOfResources: shared memory")
        y = x * 2 + (1e-5 if cfg == OTHER else 0.0)  # rounding noise is fine
        if cfg == WRONG:
            y[0, 0] += 1.0  # one wrong element: rejected
        if cfg == NAN:
            y[1, 1] = float("nan")
        return y, None
    return run


def test_tune_picks_fastest_valid():
    log, timed = [], []

    def bench(fn):  # deterministic fake timings, keyed by the config the timed closure runs
        fn()
        timed.append(log[-1])
        return {WRONG: 0.1, NAN: 0.1}.get(log[-1], TIMES.get(log[-1]))

    run = fake_run(torch.randn(4, 8), log)
    result = tuning_search.tune(key(), [DEFAULT_CONFIG, OTHER, WRONG, BROKEN, FAST, NAN], run, bench=bench, progress=True)
    assert result.best == FAST and result.best_ms == 1.0 and result.default_ms == 2.0 and result.speedup == 2.0
    assert [result.count(s) for s in ("timed", "skipped", "rejected")] == [3, 1, 2] and result.refused is None
    assert timed == [DEFAULT_CONFIG, OTHER, FAST]  # wrong and broken candidates are never timed
    status = {t.config: t.status for t in result.trials}
    assert status[WRONG] == status[NAN] == "rejected" and status[BROKEN] == "skipped"
    assert "OutOfResources" in next(t.note for t in result.trials if t.config == BROKEN)
    table = tuning_search.format_table([result])
    assert key().to_str() in table and FAST.short() in table and "2.00x" in table


def test_progress_without_tqdm(monkeypatch, capsys):
    for name in ("tqdm", "tqdm.auto"):  # import fails: plain printed lines instead
        monkeypatch.setitem(sys.modules, name, None)
    result = tuning_search.tune(key(), [OTHER, FAST], fake_run(torch.ones(2, 2), []), bench=lambda fn: 1.0, progress=True)
    assert result.count("timed") == 3 and capsys.readouterr().out.count("/2 BT=") == 2


def test_tune_clones_the_reference():
    buffer = torch.zeros(3)

    def run(cfg):  # writes into one reused output buffer, like a launcher with preallocated outputs
        buffer.fill_(2.0 if cfg == WRONG else 1.0)
        return buffer
    result = tuning_search.tune(key(), [WRONG], run, bench=lambda fn: 1.0)
    assert result.count("rejected") == 1


def test_tune_keeps_default_when_nothing_is_faster():
    run = fake_run(torch.ones(2, 2), [])
    result = tuning_search.tune(key(), [OTHER, BROKEN], run, bench=lambda fn: (fn(), 1.0)[1])
    assert result.best == DEFAULT_CONFIG and result.speedup == 1.0  # ties keep the reference


def test_compare_tolerances():
    ref = torch.ones(3, dtype=torch.bfloat16)
    assert tuning_search.compare(ref * 1.01, ref) is None and tuning_search.compare(ref * 1.1, ref) is not None
    assert tuning_search.compare(torch.ones(3) * 1.01, torch.ones(3)) is not None
    assert tuning_search.compare(torch.ones(3) * 1.01, torch.ones(3), rtol=0.05) is None
    assert tuning_search.compare((torch.ones(3),), torch.ones(3)) is not None  # structure differs
    assert tuning_search.compare(torch.ones(4), torch.ones(3)) is not None


@pytest.mark.parametrize("where", ["compile", "capture"])
def test_tune_refuses_inside_compile_or_capture(monkeypatch, where):
    if where == "compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)

    def run(cfg):
        raise AssertionError("nothing may run")
    result = tuning_search.tune(key(), [FAST], run, bench=run)
    assert result.best == DEFAULT_CONFIG and not result.trials and where in result.refused


def test_tune_refuses_inside_real_compile():
    seen = []

    def run(cfg):
        raise AssertionError("nothing may run")

    def f(x):
        seen.append(tuning_search.tune(key(), [FAST], run, bench=run).refused)
        return x + 1
    torch.compile(f, backend="eager")(torch.ones(2))
    assert seen == ["inside a torch.compile trace"]
    assert tuning_search.tuning_forbidden() is None


def test_launch_overrides_parse_or_name_the_variable(monkeypatch):
    """The experiment knobs (GSA_FORWARD_CONFIG, GSA_DECODE_CONFIG, GSA_MAXNREG, GSA_PROGRAM_WARPS) parse or raise
    naming themselves."""
    from gsa_compile import overrides
    monkeypatch.setenv(overrides.FORWARD_CONFIG_ENV, "32,128,64,8,3")
    assert overrides.forward_override() == (32, TileConfig(BK=128, BV=64, num_warps=8, num_stages=3))
    monkeypatch.setenv(overrides.MAXNREG_ENV, "output_pass=168, slot_backward=128")
    assert overrides.maxnreg_override() == {"output_pass": 168, "slot_backward": 128}
    monkeypatch.setenv(overrides.PROGRAM_WARPS_ENV, "gate_pass=8")
    assert overrides.warps_override() == {"gate_pass": 8}
    parsers = {overrides.FORWARD_CONFIG_ENV: overrides.forward_override,
               overrides.MAXNREG_ENV: overrides.maxnreg_override,
               overrides.PROGRAM_WARPS_ENV: overrides.warps_override,
               overrides.DECODE_CONFIG_ENV: overrides.decode_override}
    for name, value in ((overrides.FORWARD_CONFIG_ENV, "32,128"), (overrides.MAXNREG_ENV, "output=168"),
                        (overrides.MAXNREG_ENV, "output_pass=lots"), (overrides.MAXNREG_ENV, "output_pass=4"),
                        (overrides.PROGRAM_WARPS_ENV, "gate_pass=3"), (overrides.DECODE_CONFIG_ENV, "64,64")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=f"^{name}="):
            parsers[name]()
