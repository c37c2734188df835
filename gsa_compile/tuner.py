"""The autotuner's keys, configs and per-GPU cache files (the search itself: tuning_search.py).

    key = TuningKey.make(spec, T=T, BH=B * HQ)                 # Spec fields + pow2 buckets of T, B*HQ
    config, source = default_cache().lookup(key)               # "exact" | "nearest" | "default"
    result = tuning_search.tune(key, candidates, run)          # run(config) -> output tensor(s)
    default_cache().record(key, result.best, result.best_ms, result.default_ms)

Files, lookup order, fallbacks and env vars: autotune/README.md. A bad file never raises.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from .spec import SUPPORTED_CHUNK_SIZES, GateLayout, TileConfig, block, next_power_of_2

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: os.replace alone keeps readers safe
    fcntl = None

FORMAT, SCHEMA_VERSION = "gsa_compile.tuning", 1
T_RANGE, BH_RANGE = (256, 1 << 20), (1, 4096)
DTYPES = ("float32", "float16", "bfloat16", "float64")
DIRECTIONS = ("forward", "backward")
_PACKAGE = Path(__file__).resolve().parent
# the sources of the tuned (forward) kernels. An entry records the hash of the kernel text they generate
# for its key (kernel_text_hash) and stays valid while that text is unchanged; entries written before
# (no such field) are valid while these sources' hash equals their file's header source_hash
_SOURCES = ("templates/common.py.jinja", "templates/state_pass.py.jinja", "templates/output_pass.py.jinja",
            "programs.py", "blocks.py", "ir.py", "codegen.py")
# ... and of the backward (which recomputes the state pass): such older backward entries hold their hash
# as "kernel_hash" (an invalid backward entry is ignored: the forward's config then serves the backward)
_BACKWARD_SOURCES = _SOURCES + ("templates/state_backward.py.jinja", "templates/slot_backward.py.jinja",
                                "templates/key_backward.py.jinja", "programs_backward.py")


OPTIONAL_FIELDS = {"key_maxnreg": 0}  # config fields a file may leave out: their defaults


@dataclasses.dataclass(frozen=True)
class LaunchConfig(TileConfig):
    """What the tuner chooses per key: the TileConfig fields and the chunk size (a Spec field)."""
    chunk_size: int = 64

    def to_json(self) -> dict:
        """The fields, less the optional ones at their defaults (files stay readable by older versions)."""
        data = dataclasses.asdict(self)
        return {n: x for n, x in data.items() if n not in OPTIONAL_FIELDS or x != OPTIONAL_FIELDS[n]}

    @classmethod
    def from_json(cls, data) -> "LaunchConfig":
        """Strict: an object of these integer fields (the optional ones may be absent) with sane values, else
        ValueError."""
        names = sorted(f.name for f in dataclasses.fields(cls))
        required = [n for n in names if n not in OPTIONAL_FIELDS]
        if (not isinstance(data, dict) or not set(required) <= set(data) <= set(names)
                or any(type(x) is not int for x in data.values())):
            raise ValueError(f"config must be an object of integers {names} ({sorted(OPTIONAL_FIELDS)} optional), "
                             f"got {data!r}")
        cfg = cls(**data)
        if (cfg.chunk_size not in SUPPORTED_CHUNK_SIZES or cfg.num_warps not in (1, 2, 4, 8, 16)
                or not all(16 <= b <= 1024 and b & (b - 1) == 0 for b in (cfg.BK, cfg.BV))
                or not 1 <= cfg.num_stages <= 8 or not (cfg.key_maxnreg == 0 or 24 <= cfg.key_maxnreg <= 255)):
            raise ValueError(f"config values out of range: {data!r}")
        return cfg

    def tile_config(self) -> TileConfig:
        return TileConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TileConfig)})

    def normalized(self, K: int, V: int) -> "LaunchConfig":
        """Tiles clamped by spec.block: a power of two >= 16, <= next_pow2(K or V)."""
        return dataclasses.replace(self, BK=block(K, self.BK), BV=block(V, self.BV))

    def short(self) -> str:
        cap = f" key_maxnreg={self.key_maxnreg}" if self.key_maxnreg else ""
        return f"BT={self.chunk_size} BK={self.BK} BV={self.BV} w={self.num_warps} s={self.num_stages}{cap}"


DEFAULT_CONFIG = LaunchConfig()


def bucket(n: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, next_power_of_2(max(1, int(n)))))


@dataclasses.dataclass(frozen=True, order=True)
class TuningKey:
    layout: str
    dtype: str
    K: int
    V: int
    M: int
    group: int
    varlen: bool
    T: int  # next power of two of the length, clamped to T_RANGE
    BH: int  # next power of two of B * HQ, clamped to BH_RANGE
    # which call the config is for: the forward, or the backward (which recomputes the forward's states,
    # so its chunk size and tiles are free); absent from a key's text when "forward"
    direction: str = "forward"

    @classmethod
    def make(cls, spec_like, T: int, BH: int, direction: str = "forward") -> "TuningKey":
        """From a Spec (or anything with layout, dtype, K, V, M[, group, varlen]) and call sizes."""
        layout = spec_like.layout.value if isinstance(spec_like.layout, GateLayout) else str(spec_like.layout)
        return cls(layout, str(spec_like.dtype).replace("torch.", ""), int(spec_like.K), int(spec_like.V),
                   int(spec_like.M), int(getattr(spec_like, "group", 1)), bool(getattr(spec_like, "varlen", False)),
                   bucket(T, *T_RANGE), bucket(BH, *BH_RANGE), direction)

    def to_str(self) -> str:
        pairs = [(f.name, v) for f, v in zip(dataclasses.fields(self), dataclasses.astuple(self))]
        return "|".join(f"{name}={int(v) if isinstance(v, bool) else v}" for name, v in pairs
                        if not (name == "direction" and v == "forward"))

    @classmethod
    def from_str(cls, text) -> "TuningKey":
        """Inverse of to_str(); ValueError for anything else (wrong fields, values off the buckets)."""
        parts = dict(p.split("=", 1) for p in text.split("|") if "=" in p) if isinstance(text, str) else {}
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        if list(parts) not in (names, names[:-1]):
            raise ValueError(f"bad tuning key {text!r}")
        parts.setdefault("direction", "forward")
        key = cls(*(parts[f.name] if f.type == "str" else int(parts[f.name]) for f in fields))
        if (key.layout not in {x.value for x in GateLayout} or key.dtype not in DTYPES or key.varlen not in (0, 1)
                or min(key.K, key.V, key.M, key.group) < 1 or key.T != bucket(key.T, *T_RANGE)
                or key.BH != bucket(key.BH, *BH_RANGE) or key.direction not in DIRECTIONS):
            raise ValueError(f"bad tuning key {text!r}")
        return dataclasses.replace(key, varlen=bool(key.varlen))


@dataclasses.dataclass(frozen=True)
class Environment:
    """The header of a tuning file: it is used only by processes whose environment is equal, but for
    source_hash (the package's kernel sources when it was written), which decides only for entries
    without a kernel_text_hash."""
    gpu: str
    capability: str  # "9.0"
    triton: str
    torch: str  # without a local suffix: "2.13.0"
    source_hash: str


@functools.lru_cache(maxsize=None)
def source_hash(root: Path = _PACKAGE, sources: tuple = _SOURCES) -> str:
    """sha256 (16 hex digits) of the kernel sources: templates, IR, programs, blocks, codegen."""
    h = hashlib.sha256()
    for pattern in sources:
        for path in sorted(root.glob(pattern)):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def backward_source_hash() -> str:
    """The hash an older backward entry is valid for (the forward's kernel sources and the backward's)."""
    return source_hash(_PACKAGE, _BACKWARD_SOURCES)


def kernel_text_hash(key: "TuningKey", chunk_size: int) -> str:
    """sha256 (16 hex digits) of the generated Triton source of the kernels an entry of `key` runs at
    `chunk_size`: the forward's gate, state and output passes, or for a backward key the programs a backward
    call runs (not the output pass), each with and without initial states and also as the packed (varlen)
    variant that the segmented state pass runs. An entry is valid while this text is unchanged, whatever
    else changed (an fp16-only codegen change keeps the bf16 entries)."""
    return _kernel_text_hash(key.layout, key.dtype, key.K, key.V, key.M, key.group, key.varlen, key.direction,
                             chunk_size)


@functools.lru_cache(maxsize=None)
def _kernel_text_hash(layout, dtype, K, V, M, group, varlen, direction, chunk_size) -> str:
    from . import codegen, programs, programs_backward
    from .spec import Spec
    builders = programs.FORWARD_PROGRAMS
    if direction == "backward":  # the states it recomputes (the gate and state passes), its own programs
        builders = (programs.gate_pass, programs.state_pass) + programs_backward.BACKWARD_PROGRAMS
    h = hashlib.sha256()
    for packed in sorted({bool(varlen), True}):
        for initial_state in (False, True):
            spec = Spec(layout=GateLayout(layout), chunk_size=chunk_size, dtype=dtype, K=K, V=V, M=M, group=group,
                        varlen=packed, initial_state=initial_state, final_state=True)
            for builder in builders:
                h.update(codegen.source(builder, spec).encode() + b"\0")
    return h.hexdigest()[:16]


def entry_is_current(key: "TuningKey", entry: dict, header: dict, env: Environment) -> bool:
    """Whether an entry was tuned for the kernels this package generates for its key."""
    if "kernel_text_hash" in entry:
        return entry["kernel_text_hash"] == kernel_text_hash(key, entry["config"].chunk_size)
    same_sources = header.get("source_hash") == env.source_hash  # an entry written before kernel_text_hash
    return same_sources and (key.direction == "forward" or entry.get("kernel_hash") == backward_source_hash())


@functools.lru_cache(maxsize=None)
def current_environment(device=None) -> Environment:
    """This process's environment for `device` (default: the current CUDA device; "cpu" without)."""
    import triton
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        gpu, cap = torch.cuda.get_device_name(dev), "%d.%d" % torch.cuda.get_device_capability(dev)
    else:
        gpu, cap = "cpu", "0.0"
    return Environment(gpu, cap, triton.__version__, torch.__version__.split("+")[0], source_hash())


def gpu_file_name(gpu: str) -> str:
    """"NVIDIA H200" -> "NVIDIA_H200.json"."""
    return (re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_") or "unknown") + ".json"


def tuning_dirs() -> tuple[Path, Path]:
    """(shipped dir: $GSA_COMPILE_TUNING_DIR or <repo>/autotune, user dir: $GSA_COMPILE_CACHE_DIR/tuning)."""
    shipped, cache = os.environ.get("GSA_COMPILE_TUNING_DIR"), os.environ.get("GSA_COMPILE_CACHE_DIR")
    return (Path(shipped).expanduser() if shipped else _PACKAGE.parent / "autotune",
            (Path(cache).expanduser() if cache else Path.home() / ".cache" / "gsa_compile") / "tuning")


_warned: set = set()  # files warned about in this process


def _without_sources(header: dict) -> dict:
    return {k: v for k, v in header.items() if k != "source_hash"}


def read_entries(path: Path, env: Environment) -> dict:
    """{TuningKey: entry} of a file valid for `env`; {} plus one warning (per file and process) when
    it is corrupted, truncated, of another schema or made for another environment."""
    entries, bad, problem = {}, 0, None
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:  # unreadable, truncated, not JSON, not UTF-8
        data, problem = None, f"unreadable or corrupted ({type(err).__name__}: {err})"
    if problem is None and not (isinstance(data, dict) and data.get("format") == FORMAT
                                and isinstance(data.get("entries"), dict)):
        problem = f"not a {FORMAT} file"
    elif problem is None and data.get("version") != SCHEMA_VERSION:
        problem = f"schema version {data.get('version')!r}, expected {SCHEMA_VERSION}"
    elif problem is None and not (isinstance(data.get("header"), dict) and
                                  _without_sources(data["header"]) == _without_sources(dataclasses.asdict(env))):
        problem = f"made for {data.get('header')}, not for {dataclasses.asdict(env)}"
    stale = collections.Counter()
    for text, entry in data["entries"].items() if problem is None else ():
        try:
            key, cfg = TuningKey.from_str(text), LaunchConfig.from_json(entry["config"])
            if not all(t is None or (type(t) in (int, float) and t >= 0) for t in
                       (entry.get("time_ms"), entry.get("default_ms"))):
                raise ValueError("bad time")
            entry = dict(entry, config=cfg)
            if not entry_is_current(key, entry, data["header"], env):
                stale[key.direction] += 1
                continue
            # an older entry valid now: stamped, so that rewriting the file under a new header keeps it
            entries[key] = dict(entry, kernel_text_hash=kernel_text_hash(key, cfg.chunk_size))
        except (ValueError, TypeError, KeyError, AttributeError):
            bad += 1
    if bad:
        problem = f"{bad} malformed entr{'y' if bad == 1 else 'ies'} ignored (the other entries are used)"
    elif stale:
        n = sum(stale.values())
        problem = (f"{n} entr{'y' if n == 1 else 'ies'} ({', '.join(f'{c} {d}' for d, c in sorted(stale.items()))}) "
                   f"tuned for other kernels ignored (file written with sources {data['header'].get('source_hash')}, "
                   f"these are {env.source_hash}); `tune` again (an ignored backward entry: the forward's "
                   "config serves the backward)")
    if problem is not None and str(path) not in _warned:
        _warned.add(str(path))
        warnings.warn(f"gsa_compile tuning file {path}: {problem}", RuntimeWarning, stacklevel=3)
    return entries


_generations = itertools.count()


class TuningCache:
    """Shipped + user tuning files of one GPU. lookup() never raises; record() merges atomically."""

    def __init__(self, env: Optional[Environment] = None, shipped: Optional[Path] = None,
                 user: Optional[Path] = None):
        self.env = env or current_environment()
        self.shipped_path = Path(shipped or tuning_dirs()[0]) / gpu_file_name(self.env.gpu)
        self.user_path = Path(user or tuning_dirs()[1]) / gpu_file_name(self.env.gpu)
        self.reload()

    def reload(self) -> None:
        self._entries, self._memo = None, {}
        self.generation = next(_generations)  # unique per cache and reload: launch.Call's memoised plans compare it

    def entries(self) -> dict:
        """{TuningKey: entry}; user entries override shipped ones."""
        if self._entries is None:
            self._entries = {**read_entries(self.shipped_path, self.env), **read_entries(self.user_path, self.env)}
        return self._entries

    def lookup(self, key: TuningKey, max_distance: float = math.inf) -> tuple[LaunchConfig, str]:
        """(config, "exact" | "nearest" | "default"): the key itself (user file first), else the
        closest tuned bucket of the same shape by |log2 T ratio| + |log2 BH ratio| (ties: larger T,
        then larger BH), else DEFAULT_CONFIG normalised to K, V. Memoised until reload()/record()."""
        if (key, max_distance) not in self._memo:
            entries = self.entries()
            near = sorted((abs(math.log2(k.T / key.T)) + abs(math.log2(k.BH / key.BH)), -k.T, -k.BH, k)
                          for k in entries if dataclasses.replace(k, T=key.T, BH=key.BH) == key)
            if key in entries:
                found = entries[key]["config"], "exact"
            elif near and near[0][0] <= max_distance:
                found = entries[near[0][3]]["config"], "nearest"
            else:
                found = DEFAULT_CONFIG.normalized(key.K, key.V), "default"
            self._memo[key, max_distance] = found
        return self._memo[key, max_distance]

    def record(self, key: TuningKey, config: LaunchConfig, time_ms: Optional[float] = None,
               default_ms: Optional[float] = None, shipped: bool = False) -> bool:
        """Merge one entry into the user file (shipped=True: the shipped file) under an flock on
        `<file>.lock`: re-read, merge, write a temp file in the same directory, os.replace. A foreign
        or corrupted file is replaced. False (and a warning) when it cannot write; never raises."""
        path = self.shipped_path if shipped else self.user_path
        num = lambda x: None if x is None or not math.isfinite(x) else round(float(x), 6)  # noqa: E731
        entry = {"config": config.to_json(), "time_ms": num(time_ms), "default_ms": num(default_ms),
                 "speedup": num(default_ms / time_ms) if time_ms and default_ms else None,
                 "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "kernel_text_hash": kernel_text_hash(key, config.chunk_size)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.with_name(path.name + ".lock"), "a+") as lock:  # released on close
                if fcntl is not None:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                merged = {k.to_str(): dict(e, config=e["config"].to_json())
                          for k, e in read_entries(path, self.env).items()}
                merged[key.to_str()] = entry
                doc = {"format": FORMAT, "version": SCHEMA_VERSION, "header": dataclasses.asdict(self.env),
                       "entries": dict(sorted(merged.items()))}
                tmp = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name + ".", suffix=".tmp",
                                                  delete=False)
                try:
                    with tmp:
                        tmp.write(json.dumps(doc, indent=2) + "\n")
                        tmp.flush()
                        os.fsync(tmp.fileno())
                    os.replace(tmp.name, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp.name)
                    raise
        except OSError as err:
            warnings.warn(f"gsa_compile: cannot write tuning file {path}: {err}", RuntimeWarning, stacklevel=2)
            return False
        self.reload()
        return True


_caches: dict = {}


_by_setting: dict = {}  # (device, the variables tuning_dirs reads) -> TuningCache: no Path work per call


def default_cache(device=None) -> TuningCache:
    """The process-wide TuningCache of a device's GPU and the current directories."""
    setting = (device, *(os.environ.get(name) for name in ("GSA_COMPILE_TUNING_DIR", "GSA_COMPILE_CACHE_DIR", "HOME")))
    cache = _by_setting.get(setting)
    if cache is None:
        key = (current_environment(device), *tuning_dirs())
        if key not in _caches:
            _caches[key] = TuningCache(*key)
        cache = _by_setting[setting] = _caches[key]
    return cache
