"""OpenVINO inference of a model package: the only module of edge/ that imports openvino.

Graph contract (written by `training export`): input `[1, C, tile, tile]` float32 raw pixels
(0..255, normalisation happens inside the graph), output `probability` `[1, 1, tile, tile]` defect
probability (sigmoid inside the graph) and, for a model with a decision head, a second output
`part_probability` `[1, 1]` (sigmoid inside the graph): the tile's part probability. The frame's
part score is the max over its tiles (edge.postprocess.part_score). Packages with one output
work as before. A frame becomes several tiles (edge.preprocess); each tile is one inference
request, so tiles of one frame and successive frames run in parallel through an `AsyncInferQueue`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from edge.contract import Detection, InputSpec, ModelInfo, PackageMeta, PostprocessParams
from edge.package import PackageError, package_hash, read_package
from edge.postprocess import postprocess_map
from edge.preprocess import CoarseMap, TileLayout, blend_tiles, preprocess
from edge.tiled import predict_coarse, predict_frame

_CORE: ov.Core | None = None
_CORE_LOCK = threading.Lock()


def core() -> ov.Core:
    """One OpenVINO Core per process (creating one is slow and they share plugins anyway)."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = ov.Core()
        return _CORE


PART_OUTPUT = "part_probability"  # tensor name of the optional second output

# openvino's Python AsyncInferQueue.start_async runs its generic input dispatcher per call (a new
# InferRequest wrapper, singledispatch on the input type, a shape check): ~25 us of GIL-bound Python
# per tile, measured with the tiny test model. A tile's shape and type are fixed (read_ir checks the
# input), so Inferencer.submit does what that wrapper ends up doing - copy the tile into the idle
# request's input tensor, start the queue through the compiled binding - unless a future openvino
# lays its classes out differently; then the public method is used.
_QUEUE_BINDING = ov.AsyncInferQueue.__mro__[1]
_DIRECT_START = all(hasattr(_QUEUE_BINDING, a) for a in ("start_async", "get_idle_request_id", "__getitem__")) \
    and _QUEUE_BINDING.__module__.startswith("openvino")


def output_roles(model: ov.Model | ov.CompiledModel) -> tuple[int, int | None]:
    """(index of the probability map output, index of the part output or None).

    The part output is found by its name, else as the one rank-2 output (NNCF keeps names, but
    a renamed graph still works); with one output it is the map."""
    outs = list(model.outputs)
    if len(outs) == 1:
        return 0, None
    named = [i for i, o in enumerate(outs) if PART_OUTPUT in o.get_names()]
    part = named[0] if named else next((i for i, o in enumerate(outs) if len(o.get_partial_shape()) == 2), 1)
    return (1 if part == 0 else 0), part


def compile_config(hint: str, precision_hint: str | None = "auto", threads: int | None = None) -> dict[str, Any]:
    """The one rule for how a model is compiled on the CPU plugin.

    CPUs with bf16 units run the float parts of a model in bf16 by default, so "auto" asks for f32 for
    every package: a float package must compute as it was validated, and so must the float layers of
    an INT8 one. The export's accuracy control (NNCF) judges INT8 candidates compiled in f32 while the
    gate and the edge used the bf16 default: on Magnetic-Tile (2026-12-07) accuracy control saw no drop
    and reverted nothing, the gate then found a miss and shipped FP16. f32 also makes a package compute
    the same on a line PC without bf16 units. It cost nothing measured: an INT8 tile took 0.96-0.99x
    the time of the bf16 default here (AVX512-BF16). An explicit hint (or None: the plugin's default) wins."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": hint}
    if precision_hint == "auto":
        precision_hint = "f32"
    if precision_hint:
        config["INFERENCE_PRECISION_HINT"] = precision_hint
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def read_ir(xml_path: Path, spec: InputSpec) -> ov.Model:
    """Read an IR and check it matches the input contract; errors name the file."""
    try:
        model = core().read_model(str(xml_path))
    except Exception as e:  # OpenVINO raises RuntimeError subclasses with long texts
        raise PackageError(f"{xml_path}: OpenVINO cannot read the model: {str(e).splitlines()[0]}") from e
    if len(model.inputs) != 1 or len(model.outputs) not in (1, 2):
        raise PackageError(f"{xml_path}: expected 1 input and 1 output (or 2: map and '{PART_OUTPUT}'), "
                           f"got {len(model.inputs)}/{len(model.outputs)}")
    want_in = [1, spec.channels, spec.tile, spec.tile]
    shape_in = model.inputs[0].get_partial_shape()
    if shape_in.is_dynamic or list(shape_in.to_shape()) != want_in:
        raise PackageError(f"{xml_path}: input shape {shape_in} does not match package.json input {want_in}")
    map_i, part_i = output_roles(model)
    want_out = [1, 1, spec.out_tile, spec.out_tile]  # coarse for output_stride > 1
    shape_out = model.outputs[map_i].get_partial_shape()
    if shape_out.is_dynamic or list(shape_out.to_shape()) != want_out:
        raise PackageError(f"{xml_path}: output shape {shape_out} does not match expected {want_out}")
    if part_i is not None:
        shape_part = model.outputs[part_i].get_partial_shape()
        if shape_part.is_dynamic or list(shape_part.to_shape()) != [1, 1]:
            raise PackageError(f"{xml_path}: part output shape {shape_part} does not match expected [1, 1]")
    return model


def infer_tiles_parts(request: ov.InferRequest, tiles: np.ndarray, map_index: int = 0,
                      part_index: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """N x C x T x T raw tiles -> (N x t x t probabilities, N part probabilities or None); t is T, or
    T / output_stride for a model whose map comes out coarse."""
    out: np.ndarray | None = None
    parts = None if part_index is None else np.empty(tiles.shape[0], dtype=np.float32)
    for i in range(tiles.shape[0]):
        res = request.infer({0: tiles[i : i + 1]}, share_inputs=True)
        if out is None:
            out = np.empty((tiles.shape[0], *res[map_index].shape[-2:]), dtype=np.float32)
        out[i] = res[map_index][0, 0]
        if parts is not None and part_index is not None:
            parts[i] = res[part_index].reshape(-1)[0]
    if out is None:
        raise ValueError("no tiles to infer")
    return out, parts


def infer_tiles_sync(request: ov.InferRequest, tiles: np.ndarray, map_index: int = 0) -> np.ndarray:
    """N x C x T x T raw tiles -> N x T x T probabilities, one request after another."""
    return infer_tiles_parts(request, tiles, map_index)[0]


# callback(prob_map, error, userdata, part_score): part_score is the max of the tiles' part
# probabilities (NaN stays NaN: postprocess turns it into NonFiniteError), None without a part output;
# prob_map is a CoarseMap when the frame was submitted with coarse=True
FrameCallback = Callable[[Any, BaseException | None, Any, float | None], None]


@dataclass
class _FrameJob:
    layout: TileLayout
    outputs: np.ndarray
    parts: np.ndarray | None  # tile part probabilities (models with a part output)
    remaining: int
    userdata: Any
    callback: FrameCallback
    coarse: bool = False  # hand the callback a CoarseMap (the receiver resizes it when it needs it)
    failed: BaseException | None = None


class Inferencer:
    """A compiled model package: `predict(frame)` gives the probability map, `inspect` regions."""

    def __init__(
        self,
        model_dir: str | Path,
        xml_name: str = "model.xml",
        device: str = "CPU",
        num_requests: int = 0,
        threads: int | None = None,
        hint: str = "THROUGHPUT",
        verify: bool = True,
        precision_hint: str | None = "auto",
    ) -> None:
        # resolve once: a `current` link switched mid-load must not pair one version's metadata with another's weights
        self.model_dir = Path(model_dir).resolve()
        self.meta: PackageMeta = read_package(self.model_dir, verify_hashes=verify)
        self.spec: InputSpec = self.meta.input
        self.params: PostprocessParams = self.meta.postprocess
        model = read_ir(self.model_dir / xml_name, self.spec)
        self.map_index, self.part_index = output_roles(model)
        self.has_part = self.part_index is not None
        precision = self.meta.precision if xml_name == "model.xml" else Path(xml_name).parent.name or "fp32"
        config = compile_config(hint, precision_hint, threads)
        try:
            self.compiled = core().compile_model(model, device, config)
        except Exception as e:
            raise PackageError(f"{self.model_dir / xml_name}: cannot compile for {device}: {str(e).splitlines()[0]}") from e
        n = num_requests or int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.num_requests = max(1, n)
        self._sync_request = self.compiled.create_infer_request()
        self._queue = ov.AsyncInferQueue(self.compiled, self.num_requests)
        # Not a bound method: the queue (C++) would then keep this Inferencer, and with it the
        # compiled model, alive forever - a cycle Python's GC cannot see (one model per reload).
        self._queue.set_callback(_tile_callback(threading.Lock(), self.spec.overlap, self.map_index,
                                                self.part_index))
        self._submit_lock = threading.Lock()  # submit vs close: no frame starts on a released model
        self._closed = False
        self.info = ModelInfo(self.meta.name, self.meta.version, package_hash(self.meta), precision)

    # -- synchronous use (CLI inspect, evaluation, benchmarks) ------------------------------------
    def infer_tiles(self, tiles: np.ndarray) -> np.ndarray:
        return infer_tiles_sync(self._sync_request, tiles, self.map_index)

    def infer_tiles_parts(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N x T x T maps, N tile part probabilities or None without a part output)."""
        return infer_tiles_parts(self._sync_request, tiles, self.map_index, self.part_index)

    def predict(self, frame: np.ndarray) -> np.ndarray:
        """Frame -> HxW probability map of the whole frame."""
        return self.predict_part(frame)[0]

    def predict_part(self, frame: np.ndarray) -> tuple[np.ndarray, float | None]:
        """Frame -> (HxW probability map, part score or None); NonFiniteError for a NaN part output."""
        return predict_frame(self, frame, self.spec)

    def inspect(self, frame: np.ndarray, params: PostprocessParams | None = None) -> Detection:
        """Preprocess, infer, postprocess: nothing else."""
        prob, part = predict_coarse(self, frame, self.spec)
        return postprocess_map(prob, params or self.params, part)

    # -- asynchronous use (the daemon pipeline) ---------------------------------------------------
    def submit(
        self,
        frame: np.ndarray,
        userdata: Any,
        callback: FrameCallback,
        coarse: bool = False,
    ) -> None:
        """Queue a frame; `callback(prob_map, error, userdata, part_score)` runs on an OpenVINO thread
        when done (part_score None for a package without a part output). With `coarse` the map is a
        CoarseMap: a queue of waiting parts then holds ~1/16 of the full float map each (5 MP: 1 vs 20 MB).

        Blocks while all requests are busy, which is the back-pressure the pipeline wants.
        Preprocessing errors raise here, in the caller's thread.
        """
        tiles, layout = preprocess(frame, self.spec, np.uint8)  # float32 one tile at a time, below
        job = _FrameJob(layout, np.empty((len(tiles), self.spec.out_tile, self.spec.out_tile), np.float32),
                        np.empty(len(tiles), np.float32) if self.has_part else None, len(tiles), userdata, callback, coarse)
        with self._submit_lock:
            if self._closed:
                raise ModelClosed(f"model {self.model_dir} was unloaded (reload); submit to the current one")
            for i in range(len(tiles)):
                self._start(tiles[i : i + 1], (job, i))

    def _start(self, tile: np.ndarray, token: tuple[_FrameJob, int]) -> None:
        """One 1 x C x T x T tile (uint8 or float32) into the next idle request (blocks while all are busy);
        the copy into the request's float32 tensor converts it."""
        q = self._queue
        if not _DIRECT_START:
            q.start_async({0: tile.astype(np.float32, copy=False)}, token)
            return
        # the request start_async takes next is the idle one: one submitter at a time (_submit_lock)
        _QUEUE_BINDING.__getitem__(q, q.get_idle_request_id()).get_input_tensor(0).data[:] = tile
        _QUEUE_BINDING.start_async(q, {}, token)

    def wait_all(self) -> None:
        """Block until every submitted tile has finished."""
        self._queue.wait_all()

    def close(self) -> None:
        """Finish the requests in flight, then release the compiled model, its requests and threads.

        After a reload the old model must go: OpenVINO keeps weights and executor threads per
        compiled model, so every model kept alive costs its full size (measured: +66 MB and two
        threads per SIGHUP with a 32 MB package). Later submits raise ModelClosed."""
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.wait_all()
            del self._queue, self._sync_request, self.compiled


class ModelClosed(RuntimeError):
    """submit() on an Inferencer that close() released: the caller takes the current model."""


def _tile_callback(lock: threading.Lock, overlap: int, map_index: int = 0,
                   part_index: int | None = None) -> Callable[[ov.InferRequest, tuple[_FrameJob, int]], None]:
    """The AsyncInferQueue callback: collects a frame's tiles, stitches them, calls the frame's callback."""

    def on_tile_done(request: ov.InferRequest, token: tuple[_FrameJob, int]) -> None:
        job, i = token
        try:
            job.outputs[i] = request.get_output_tensor(map_index).data[0, 0]
            if job.parts is not None and part_index is not None:
                job.parts[i] = request.get_output_tensor(part_index).data.reshape(-1)[0]
        except BaseException as e:  # keep the frame's accounting right whatever happens
            job.failed = e
        with lock:
            job.remaining -= 1
            done = job.remaining == 0
        if not done:
            return
        if job.failed is not None:
            job.callback(None, job.failed, job.userdata, None)
            return
        try:
            coarse = blend_tiles(job.outputs, job.layout, overlap)
            prob: np.ndarray | CoarseMap = coarse if job.coarse else coarse.full()
            # max propagates NaN: the result thread's postprocess turns it into an error verdict
            part = None if job.parts is None else float(job.parts.max())
        except BaseException as e:
            job.callback(None, e, job.userdata, None)
            return
        job.callback(prob, None, job.userdata, part)

    return on_tile_done
