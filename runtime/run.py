#!/usr/bin/env python3
"""Measure an ONNX image classifier with onnxruntime: latency, throughput, peak memory and accuracy.

One file, copied alone to a board (Raspberry Pi, Jetson) beside a ``.onnx``; it needs only ``onnxruntime``, ``numpy``
and the standard library::

    python run.py model.onnx                       # random inputs of the model's shape
    python run.py model.onnx --data val.npz        # raw images: x uint8 [N, H, W, C], y int labels [N]
    python run.py model.onnx --threads 4 --warmup 20 --runs 200 --batch 1 --json result.json

With ``--data`` the images are preprocessed as the model's metadata (``tmlp.preprocessing``) says: bilinear resize to
the input size, scale to [0, 1], subtract the mean, divide by the std, NHWC -> NCHW. ``tmlp bench`` imports this file
(as ``tmlp.runtime.run``) so that host and device figures are measured by the same code.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PREPROCESSING_KEY = "tmlp.preprocessing"
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class RunError(Exception):
    """A problem with the user's input, reported as one line."""


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing (shared with tmlp's training code so that the two always agree)
# ----------------------------------------------------------------------------------------------------------------
def _bilinear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a 1-D bilinear resize (half-pixel centres, as torch's align_corners=False)."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w_hi = (src - lo).astype(np.float32)
    return lo, hi, w_hi


def resize_bilinear(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize ``images`` [N, H, W, C] (any real dtype) to [N, height, width, C] float32, bilinear."""
    x = images.astype(np.float32, copy=False)
    n, h, w, c = x.shape
    if (h, w) == (height, width):
        return x.copy() if x is images else x
    lo, hi, wy = _bilinear_weights(h, height)
    x = x[:, lo] * (1.0 - wy)[None, :, None, None] + x[:, hi] * wy[None, :, None, None]
    lo, hi, wx = _bilinear_weights(w, width)
    x = x[:, :, lo] * (1.0 - wx)[None, None, :, None] + x[:, :, hi] * wx[None, None, :, None]
    return x.astype(np.float32, copy=False)


def preprocess(images: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Raw uint8 images [N, H, W, C] -> float32 model input [N, C, H', W'] as ``spec`` (the model's metadata) says."""
    height, width = spec["input_size"]
    x = resize_bilinear(images, height, width) * np.float32(spec.get("scale", 1.0 / 255.0))
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec["std"], dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def load_images(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Load ``x`` uint8 [N, H, W, C] and optional ``y`` int [N] from an ``.npz`` file, checking shapes and dtypes."""
    if not os.path.isfile(path):
        raise RunError(f"data file {path!r} does not exist; pass an .npz with arrays x (uint8 NHWC) and y")
    try:
        with np.load(path) as archive:
            if "x" not in archive:
                raise RunError(f"{path!r} has no array 'x' (found {sorted(archive.files)}); save images as x")
            x = archive["x"]
            y = archive["y"] if "y" in archive else None
    except (OSError, ValueError) as err:
        raise RunError(f"cannot read {path!r} as .npz ({err}); write it with numpy.savez") from None
    if x.dtype != np.uint8 or x.ndim != 4:
        raise RunError(f"{path!r}: x must be uint8 [N, H, W, C], got {x.dtype} {list(x.shape)}")
    if y is not None:
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise RunError(f"{path!r}: y must be integer labels [N={len(x)}], got {y.dtype} {list(y.shape)}")
    return x, y


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmHWM, VmRSS) in MiB; None where there is no /proc (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MiB (Linux: VmHWM; elsewhere getrusage)."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0
    except (ImportError, OSError):
        return None


def current_rss_mb() -> float | None:
    """Current resident set size in MiB (Linux only; None elsewhere)."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0) so that the next peak counts only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    """Everything one run of a model measured. Latencies in milliseconds, memory in MiB, sizes in bytes."""

    model: str
    file_bytes: int
    provider: str  # the provider that ran the model (onnxruntime's first for the session)
    threads: int
    batch: int
    warmup: int
    runs: int
    latency_ms: dict[str, float] = field(default_factory=dict)
    throughput_per_s: float = 0.0
    rss_baseline_mb: float | None = None
    peak_rss_mb: float | None = None
    peak_rss_delta_mb: float | None = None
    arena: bool = True
    weights_mb: float | None = None  # the model's initializers
    static_rss_mb: float | None = None  # RSS the loaded session adds (weights as onnxruntime holds them, prepacked)
    activation_rss_mb: float | None = None  # peak RSS during the timed runs above the loaded session
    peak_rss_delta_no_arena_mb: float | None = None  # --memory / --report: the same run with the CPU arena off
    accuracy: float | None = None
    n_eval: int = 0
    inputs: str = "random"
    requested_provider: str = ""  # what was asked for; differs from ``provider`` only under --allow-fallback
    metadata: dict[str, str] = field(default_factory=dict)
    machine: dict[str, str] = field(default_factory=dict)


def model_bytes(path: str) -> int:
    """Bytes of the ``.onnx`` file plus any external-data files it names beside it."""
    total = os.path.getsize(path)
    try:
        import onnx

        model = onnx.load(path, load_external_data=False)
        seen = set()
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value not in seen:
                    seen.add(entry.value)
                    total += os.path.getsize(os.path.join(os.path.dirname(path), entry.value))
    except ImportError:  # on a board without onnx, count files named like the model's external data
        base = os.path.basename(path)
        folder = os.path.dirname(os.path.abspath(path))
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                     if f.startswith(base) and f != base and f.endswith(".data"))
    return total


# bytes per element of ONNX TensorProto.DataType values
_ONNX_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 17: 1, 18: 1,
                  19: 1, 20: 1, 21: 1, 22: 1}


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview):
    """(field number, wire type, value or payload view) of one protobuf message, in order."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_metadata(path: str) -> dict[str, str]:
    """The model's metadata_props (ModelProto field 14: key = 1, value = 2), read without onnxruntime or onnx."""
    try:
        with open(path, "rb") as f:
            buf = memoryview(f.read())
        out = {}
        for number, wire, entry in _fields(buf):
            if number == 14 and wire == 2:
                fields = {n: bytes(v).decode("utf-8", "replace") for n, w, v in _fields(entry) if w == 2}
                out[fields.get(1, "")] = fields.get(2, "")
        return out
    except (OSError, ValueError, IndexError):
        return {}


def weights_bytes(path: str) -> int | None:
    """Bytes of the model's initializers (its weights), read from the .onnx protobuf without the onnx package
    (ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.dims = 1, data_type = 2). None if unreadable."""
    try:
        with open(path, "rb") as f:
            buf = memoryview(f.read())
        graph = next(v for n, w, v in _fields(buf) if n == 7 and w == 2)
        total = 0
        for number, wire, tensor in _fields(graph):
            if number != 5 or wire != 2:
                continue
            dims, dtype = [], 1
            for n, w, v in _fields(tensor):
                if n == 1 and w == 0:
                    dims.append(v)
                elif n == 1 and w == 2:  # packed dims
                    pos = 0
                    while pos < len(v):
                        d, pos = _varint(v, pos)
                        dims.append(d)
                elif n == 2 and w == 0:
                    dtype = v
            count = 1
            for d in dims:
                count *= d
            total += count * _ONNX_ITEMSIZE.get(dtype, 4)
        return total
    except (OSError, StopIteration, ValueError, IndexError):
        return None


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def file_sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_model_file(path: str, manifest: bool = True) -> None:
    """Refuse, with one line naming the problem and the fix, a model file that is missing, empty, a Git LFS pointer,
    or that differs from the sha256/size recorded for it in a manifest.json beside it."""
    if not os.path.isfile(path):
        raise RunError(f"model file {path!r} does not exist; pass the path of an .onnx file")
    size = os.path.getsize(path)
    if size == 0:
        raise RunError(f"model file {path!r} is empty; copy the .onnx again")
    with open(path, "rb") as f:
        head = f.read(len(LFS_POINTER))
    if head == LFS_POINTER:
        raise RunError(f"{path!r} is a Git LFS pointer, not the model; run `git lfs pull` (or copy the real file)")
    listing = os.path.join(os.path.dirname(os.path.abspath(path)), "manifest.json")
    if not manifest or not os.path.isfile(listing):
        return
    try:
        with open(listing) as f:
            entry = json.load(f).get("files", {}).get(os.path.basename(path))
    except (OSError, ValueError, AttributeError):
        raise RunError(f"{listing!r} beside the model is not a tmlp manifest (unreadable JSON); remove it or copy it "
                       "again") from None
    if entry is None:
        return
    if entry.get("bytes") != size or entry.get("sha256") != file_sha256(path):
        raise RunError(f"{path!r} does not match manifest.json ({size} bytes, expected {entry.get('bytes')}; or a "
                       "different sha256): the copy is incomplete or altered; copy it again (or pass --no-manifest)")


# onnxruntime load errors -> what the user should do
_LOAD_ERRORS = (
    ("Unsupported model IR version", "the model's ONNX IR version is newer than this onnxruntime reads; upgrade "
                                     "onnxruntime or export for this board with `tmlp export --device NAME`"),
    ("opset", "the model uses an opset this onnxruntime does not implement; upgrade onnxruntime or export with "
              "`tmlp export --device NAME`"),
    ("Protobuf parsing failed", "the file is truncated or not an ONNX model; copy it again"),
    ("No graph was found in the protobuf", "the file is truncated or not an ONNX model; copy it again"),
)


def session_providers(provider: str, fallback: bool = False) -> list[str]:
    """The provider list for ``provider`` (cpu, cuda, tensorrt or an onnxruntime name), CPU after it. A provider
    this onnxruntime lacks is an error naming the ones it has, unless ``fallback`` allows the CPU instead."""
    import onnxruntime as ort

    wanted = PROVIDERS.get(provider, provider)
    available = ort.get_available_providers()
    if wanted in available:
        return [wanted] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])
    if not fallback:
        names = ", ".join(f"{k} ({v})" if (k := _short(v)) else v for v in available)
        raise RunError(f"--provider {provider}: this onnxruntime {ort.__version__} has no {wanted} (it has {names}); "
                       "install the build that has it (onnxruntime-gpu for cuda/tensorrt), or pass --allow-fallback "
                       "to run on the CPU and have the report say so")
    return ["CPUExecutionProvider"]


def _short(name: str) -> str:
    return next((k for k, v in PROVIDERS.items() if v == name), "")


def make_session(path: str, provider: str = "cpu", threads: int = 1, arena: bool = True,
                 manifest: bool = True, fallback: bool = False):
    """An onnxruntime InferenceSession with fixed intra-op threads on ``provider`` (CPU after it for the nodes it
    does not take); a provider this onnxruntime lacks, or cannot start, is an error unless ``fallback`` allows the
    CPU (``session.get_providers()[0]`` says which ran). The file is checked first (``check_model_file``)."""
    import onnxruntime as ort

    check_model_file(path, manifest)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = arena
    if int(read_metadata(path).get("tmlp.chunks", "1") or 1) > 1:
        # Token-chunked Taylor blocks: onnxruntime's buffer reuse would hand each chunk's gathered tensor to the
        # next block's chunk and so keep every chunk's buffer alive at once (measured: 4 chunks held 4x the memory)
        options.enable_mem_reuse = False
    options.log_severity_level = 3
    providers = session_providers(provider, fallback)
    try:
        session = ort.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        for pattern, advice in _LOAD_ERRORS:
            if pattern.lower() in text.lower():
                raise RunError(f"onnxruntime {ort.__version__} cannot load {path!r}: {advice} ({first[:160]})") from None
        raise RunError(f"onnxruntime cannot load {path!r}: {first[:300]}") from None
    if session.get_providers()[0] != providers[0] and not fallback:  # listed, but it could not start (no driver)
        raise RunError(f"--provider {provider}: {providers[0]} is installed but did not start (onnxruntime ran "
                       f"{session.get_providers()[0]}); check the driver and libraries, or pass --allow-fallback")
    return session


def input_shape(session, batch: int) -> tuple[str, list[int]]:
    """Name and concrete shape of the model's single image input, with the batch dimension set to ``batch``."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise RunError(f"expected a model with one image input, found {len(inputs)}: {[i.name for i in inputs]}")
    shape = [batch if i == 0 else d for i, d in enumerate(inputs[0].shape)]
    if any(not isinstance(d, int) for d in shape):
        raise RunError(f"input {inputs[0].name!r} has symbolic dimensions {inputs[0].shape} beyond the batch")
    return inputs[0].name, shape


def percentiles(times_ms: list[float]) -> dict[str, float]:
    """p50/p90/p99, mean, min and max of a list of latencies in ms."""
    t = np.asarray(times_ms, dtype=np.float64)
    return {
        "p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90)),
        "p99": float(np.percentile(t, 99)), "mean": float(t.mean()), "min": float(t.min()), "max": float(t.max()),
    }


def time_batches(session, name: str, batches: list[np.ndarray], warmup: int, runs: int) -> list[float]:
    """Run ``warmup`` untimed then ``runs`` timed inferences, cycling through ``batches``; returns ms per run."""
    for i in range(warmup):
        session.run(None, {name: batches[i % len(batches)]})
    times = []
    for i in range(runs):
        feed = {name: batches[(warmup + i) % len(batches)]}
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def evaluate(session, name: str, x: np.ndarray, y: np.ndarray, batch: int = 64) -> float:
    """Top-1 accuracy (fraction) of the model's first output over preprocessed inputs ``x`` [N, C, H, W]."""
    correct = 0
    for start in range(0, len(x), batch):
        logits = session.run(None, {name: x[start:start + batch]})[0]
        if logits.ndim != 2:
            raise RunError(f"model output has shape {list(logits.shape)}; expected class scores [batch, classes]")
        if start == 0 and y.max() >= logits.shape[1]:
            raise RunError(f"labels go up to {int(y.max())} but the model has {logits.shape[1]} classes")
        correct += int((logits.argmax(axis=1) == y[start:start + batch]).sum())
    return correct / len(x)


# "CPU part" codes of Arm cores (implementer 0x41), for boards whose /proc/cpuinfo names no model.
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
             "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
             "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE",
             "0xd4b": "Cortex-A78C"}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo ("model name" on x86, the Arm core from "CPU part" on arm64 boards)."""
    name, part, board = None, None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip().lower(), value.strip()
                if key in ("model name", "cpu model") and name is None:
                    name = value
                elif key == "cpu part" and part is None:
                    part = value
                elif key == "model" and not value.isdigit():
                    board = value  # Raspberry Pi OS: "Raspberry Pi 4 Model B Rev 1.4" (x86: a model number)
    except OSError:
        pass
    if name is None and part is not None:
        name = f"Arm {ARM_PARTS.get(part, 'core ' + part)}"
    if board:
        name = f"{board}, {name}" if name else board
    return name or platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    """What this was measured on."""
    import onnxruntime as ort

    cpu = cpu_name()
    return {"machine": platform.machine(), "system": platform.system(), "cpu": cpu, "cores": str(os.cpu_count()),
            "python": platform.python_version(), "onnxruntime": ort.__version__, "numpy": np.__version__}


def measure(path: str, data: str | None = None, provider: str = "cpu", threads: int = 1, warmup: int = 10,
            runs: int = 50, batch: int = 1, eval_limit: int | None = None, seed: int = 0,
            accuracy: bool = True, arena: bool = True, manifest: bool = True, fallback: bool = False
            ) -> Measurement:
    """Load ``path`` and measure latency (``runs`` timed batches of ``batch``), peak RSS and, with labelled data,
    accuracy. Peak RSS counts from after the data are loaded to the end of the timed runs: model weights, arena
    and activations at ``batch`` (the accuracy pass afterwards is not counted)."""
    if warmup < 0 or runs < 1 or batch < 1 or threads < 0:
        raise RunError("--warmup must be >= 0, --runs >= 1, --batch >= 1 and --threads >= 0")
    import onnxruntime as ort  # noqa: F401  (imported before the baseline so that it does not count)

    rng = np.random.default_rng(seed)
    images = labels = None
    if data is not None:
        images, labels = load_images(data)
        if eval_limit is not None:
            images, labels = images[:eval_limit], (labels[:eval_limit] if labels is not None else None)
    reset_peak_rss()
    baseline = current_rss_mb()
    session = make_session(path, provider, threads, arena, manifest, fallback)
    loaded = current_rss_mb()
    meta = dict(session.get_modelmeta().custom_metadata_map)
    name, shape = input_shape(session, batch)
    if images is not None:
        if PREPROCESSING_KEY not in meta:
            raise RunError(f"{path!r} has no '{PREPROCESSING_KEY}' metadata, so raw images cannot be prepared for it;"
                           " run without --data")
        spec = json.loads(meta[PREPROCESSING_KEY])
        if images.shape[-1] != spec.get("channels", images.shape[-1]):
            raise RunError(f"images have {images.shape[-1]} channels, the model expects {spec['channels']}")
        x = preprocess(images, spec)
        if list(x.shape[1:]) != shape[1:]:
            raise RunError(f"preprocessed images have shape {list(x.shape[1:])}, the model expects {shape[1:]}")
        n_batches = max(1, min(len(x) // batch, 64))
        batches = [x[i * batch:(i + 1) * batch] for i in range(n_batches)]
        if len(batches[0]) < batch:
            raise RunError(f"--batch {batch} is larger than the {len(x)} images in {data!r}")
    else:
        batches = [rng.standard_normal(shape).astype(np.float32) for _ in range(8)]
    times = time_batches(session, name, batches, warmup, runs)
    peak = peak_rss_mb()  # model, arena and activations at --batch; before the accuracy pass (batches of 64)
    lat = percentiles(times)
    result = Measurement(model=path, file_bytes=model_bytes(path), provider=session.get_providers()[0],
                         threads=threads, batch=batch, warmup=warmup, runs=runs, latency_ms=lat,
                         throughput_per_s=batch * 1e3 / lat["mean"], metadata=meta, machine=machine_info(),
                         inputs=data or "random", arena=arena,
                         requested_provider=PROVIDERS.get(provider, provider))
    weights = weights_bytes(path)
    result.weights_mb = None if weights is None else weights / (1024.0 * 1024.0)
    if images is not None and labels is not None and accuracy:
        result.accuracy = evaluate(session, name, x, labels)
        result.n_eval = len(x)
    result.rss_baseline_mb, result.peak_rss_mb = baseline, peak
    if peak is not None and baseline is not None:
        result.peak_rss_delta_mb = peak - baseline
    if loaded is not None and baseline is not None and peak is not None:
        result.static_rss_mb = loaded - baseline  # the loaded session: weights as onnxruntime holds them
        result.activation_rss_mb = peak - loaded  # what running adds at its peak: activations, arena, buffers
    return result


def describe_provider(m: Measurement) -> str:
    """The provider that ran, and what was asked for when that differs (--allow-fallback)."""
    if m.requested_provider and m.requested_provider != m.provider:
        return f"{m.provider} (asked for {m.requested_provider}, not available: fell back)"
    return m.provider


def format_report(m: Measurement) -> str:
    """Human-readable summary of a Measurement."""
    lat = m.latency_ms
    lines = [
        f"model       {m.model} ({m.file_bytes / 1e6:.2f} MB)",
        f"machine     {m.machine.get('machine')} {m.machine.get('cpu')}, {m.machine.get('cores')} cores, "
        f"onnxruntime {m.machine.get('onnxruntime')}, {describe_provider(m)}, {m.threads} thread(s)",
        f"inputs      {m.inputs}, batch {m.batch}, warm-up {m.warmup}, timed runs {m.runs}",
        f"latency     p50 {lat['p50']:.3f} ms  p90 {lat['p90']:.3f} ms  p99 {lat['p99']:.3f} ms  "
        f"(mean {lat['mean']:.3f}, min {lat['min']:.3f})",
        f"throughput  {m.throughput_per_s:.1f} images/s",
    ]
    if m.peak_rss_delta_mb is not None:
        lines.append(f"peak RSS    {m.peak_rss_mb:.1f} MiB ({m.peak_rss_delta_mb:+.1f} MiB above the "
                     f"{m.rss_baseline_mb:.1f} MiB after import and data loading; CPU arena "
                     f"{'on' if m.arena else 'off'})")
    if m.weights_mb is not None:
        line = f"memory      weights {m.weights_mb:.1f} MiB in the file"
        if m.static_rss_mb is not None:
            line += (f"; loaded session {m.static_rss_mb:.1f} MiB (static), running adds {m.activation_rss_mb:.1f} MiB "
                     "(activations)")
        if m.peak_rss_delta_no_arena_mb is not None:
            line += f"; peak with the arena off {m.peak_rss_delta_no_arena_mb:+.1f} MiB"
        lines.append(line)
    if m.accuracy is not None:
        lines.append(f"accuracy    {100 * m.accuracy:.2f}% top-1 on {m.n_eval} images")
    for key in sorted(m.metadata):
        value = m.metadata[key]
        lines.append(f"meta        {key} = {value if len(value) < 120 else value[:117] + '...'}")
    return "\n".join(lines)


@dataclass
class Soak:
    """``--duration``: inferences run back to back for ``seconds``; RSS sampled about every ``interval_s``."""

    seconds: float
    inferences: int
    rss_mb: list[float]
    growth_mb: float  # mean RSS over the last quarter of the samples minus over the first quarter
    slope_mb_per_min: float  # least-squares slope of RSS over time
    grew: bool  # growth beyond noise: more than max(2 MiB, 2% of the first quarter's RSS)

    def summary(self) -> str:
        return (f"soak        {self.inferences} inferences in {self.seconds:.0f} s; RSS {self.rss_mb[0]:.1f} -> "
                f"{self.rss_mb[-1]:.1f} MiB (max {max(self.rss_mb):.1f}), growth {self.growth_mb:+.2f} MiB, slope "
                f"{self.slope_mb_per_min:+.3f} MiB/min: {'GREW' if self.grew else 'no growth beyond noise'}")


def soak(path: str, seconds: float, batch: int = 1, threads: int = 1, provider: str = "cpu",
         interval_s: float = 0.5, seed: int = 0, fallback: bool = False) -> Soak:
    """Run ``path`` on random inputs continuously for ``seconds`` and report whether its RSS grew (a leak check)."""
    if seconds <= 0:
        raise RunError(f"--duration must be > 0 seconds, got {seconds}")
    session = make_session(path, provider, threads, fallback=fallback)
    name, shape = input_shape(session, batch)
    feeds = [np.random.default_rng(seed + i).standard_normal(shape).astype(np.float32) for i in range(8)]
    for i in range(10):  # warm-up: the arena and caches reach their working size
        session.run(None, {name: feeds[i % 8]})
    times, rss, count = [], [], 0
    start = next_sample = time.perf_counter()
    while True:
        now = time.perf_counter()
        if now >= next_sample:
            times.append(now - start)
            rss.append(current_rss_mb() or 0.0)
            next_sample += interval_s
        if now - start >= seconds:
            break
        session.run(None, {name: feeds[count % 8]})
        count += 1
    q = max(1, len(rss) // 4)
    first, last = float(np.mean(rss[:q])), float(np.mean(rss[-q:]))
    slope = float(np.polyfit(times, rss, 1)[0]) * 60 if len(rss) > 1 else 0.0
    growth = last - first
    return Soak(seconds=times[-1], inferences=count, rss_mb=rss, growth_mb=growth, slope_mb_per_min=slope,
                grew=growth > max(2.0, 0.02 * first))


def dump_outputs(path: str, inputs: str, out: str, threads: int = 1, batch: int = 16) -> list[str]:
    """Run ``path`` on the preprocessed ``input`` array [N, ...] of the .npz ``inputs`` in batches and save every
    graph output (concatenated along axis 0) to the .npz ``out``; returns the output names. Used by
    ``tmlp devices check`` to compare a board (or an emulated one) with the host on identical inputs."""
    if not os.path.isfile(inputs):
        raise RunError(f"inputs file {inputs!r} does not exist")
    with np.load(inputs) as archive:
        if "input" not in archive:
            raise RunError(f"{inputs!r} has no array 'input' (the preprocessed model input)")
        x = archive["input"]
    session = make_session(path, "cpu", threads)
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(x), batch):
        for n, value in zip(names, session.run(None, {name: x[start:start + batch]})):
            parts[n].append(np.asarray(value))
    tmp = out + ".tmp.npz"
    np.savez(tmp, **{f"out{i}": np.concatenate(parts[n]) for i, n in enumerate(names)})
    os.replace(tmp, out)
    return names


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: argument --runs: ... (see run.py --help)``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _at_least(minimum: int, maximum: int = 10**9):
    """An argparse type: an integer from ``minimum`` to ``maximum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"takes an integer from {minimum} to {maximum}, got {text!r}")
        return value
    parse.kind = int
    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"takes a number of seconds > 0, got {text!r}")
    return value


_positive_seconds.kind = float


def _check_output(path: str | None, flag: str) -> None:
    """An output file's folder must exist and the path must not be a folder (checked before any measuring)."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not path or os.path.isdir(path):
        raise RunError(f"{flag} {path!r} is a folder or empty; pass a file name like out.json")
    if not os.path.isdir(folder):
        raise RunError(f"{flag} {path!r}: folder {folder!r} does not exist; create it first")


def build_parser() -> argparse.ArgumentParser:
    """The command line of run.py; bad values are one-line errors naming the option (exit 2)."""
    parser = _Parser(description="Measure an ONNX model with onnxruntime: latency, memory, accuracy.")
    parser.add_argument("model", help="path of the .onnx file")
    parser.add_argument("--data", help=".npz with raw images x (uint8 [N,H,W,C]) and labels y; random inputs if absent")
    parser.add_argument("--threads", type=_at_least(1, 1024), default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--warmup", type=_at_least(0), default=10, help="untimed runs before timing (default 10)")
    parser.add_argument("--runs", type=_at_least(1), default=50, help="timed runs (default 50)")
    parser.add_argument("--batch", type=_at_least(1, 65536), default=1, help="images per timed run (default 1)")
    parser.add_argument("--provider", default="cpu",
                        help="cpu, cuda or tensorrt (one this onnxruntime has, else an error); default cpu")
    parser.add_argument("--allow-fallback", action="store_true",
                        help="run on the CPU when --provider is not available (the report names the provider that ran)")
    parser.add_argument("--limit", type=_at_least(1), default=None, help="evaluate accuracy on the first N images only")
    parser.add_argument("--no-accuracy", action="store_true", help="time only; skip the accuracy pass over --data")
    parser.add_argument("--json", help="also write the measurement to this JSON file")
    parser.add_argument("--duration", type=_positive_seconds, default=None, metavar="S",
                        help="soak test: run continuously for S seconds and report whether RSS grew (exit 1 if so)")
    parser.add_argument("--no-arena", action="store_true", help="turn onnxruntime's CPU memory arena off")
    parser.add_argument("--no-manifest", action="store_true",
                        help="do not check the model against the manifest.json beside it (sha256 and size)")
    parser.add_argument("--memory", action="store_true",
                        help="also measure peak RSS with the arena off (a second, fresh process)")
    parser.add_argument("--report", metavar="OUT.json",
                        help="write a device report (everything above, with --memory) for `tmlp bench --compare`")
    parser.add_argument("--label", default=None, help="name of this board in the report [default: the hostname]")
    parser.add_argument("--dump-outputs", metavar="OUT.npz",
                        help="with --inputs: save every graph output on those inputs to OUT.npz, then measure")
    parser.add_argument("--inputs", metavar="IN.npz", help="preprocessed model inputs (array 'input') for --dump-outputs")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for path, flag in ((args.json, "--json"), (args.report, "--report"), (args.dump_outputs, "--dump-outputs")):
            _check_output(path, flag)
        if args.duration is not None:
            result = soak(args.model, args.duration, args.batch, args.threads, args.provider,
                          fallback=args.allow_fallback)
            print(result.summary())
            if args.json:
                _write_json(args.json, asdict(result))
            return 1 if result.grew else 0
        if args.dump_outputs:
            if not args.inputs:
                raise RunError("--dump-outputs needs --inputs IN.npz (array 'input', the preprocessed model input)")
            dump_outputs(args.model, args.inputs, args.dump_outputs, args.threads)
        m = measure(args.model, args.data, args.provider, args.threads, args.warmup, args.runs, args.batch,
                    args.limit, accuracy=not args.no_accuracy, arena=not args.no_arena,
                    manifest=not args.no_manifest, fallback=args.allow_fallback)
        if (args.memory or args.report) and not args.no_arena:
            m.peak_rss_delta_no_arena_mb = _peak_without_arena(args)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(m))
    if args.json:
        _write_json(args.json, asdict(m))
    if args.report:
        _write_json(args.report, {"format": "tmlp-device-report", "version": 1,
                                  "label": args.label or platform.node(), **asdict(m)})
        print(f"report      {args.report}")
    return 0


def _write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder (never a half-written file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _peak_without_arena(args: argparse.Namespace) -> float | None:
    """Peak RSS delta (MiB) of the same timed runs with the CPU arena off, measured in a fresh process."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "no-arena.json")
        cmd = [sys.executable, os.path.abspath(__file__), args.model, "--no-arena", "--no-accuracy", "--threads",
               str(args.threads), "--warmup", str(args.warmup), "--runs", str(args.runs), "--batch", str(args.batch),
               "--provider", args.provider, "--json", out] + (["--data", args.data] if args.data else []) + \
            (["--allow-fallback"] if args.allow_fallback else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            raise RunError(f"the arena-off measurement failed: {tail[-1] if tail else 'no output'}")
        with open(out) as f:
            return json.load(f)["peak_rss_delta_mb"]


if __name__ == "__main__":
    sys.exit(main())
