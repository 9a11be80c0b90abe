"""int8 inference and ONNX export through ONNX Runtime: a merged token classifier exported to ONNX, its attention,
LayerNorm and GELU fused by ORT's transformer optimizer, its matmuls dynamically quantized to int8 with one scale
per output channel. Chosen by measurement over torch.ao's quantize_dynamic (per tensor: -1.0 to -1.4 validation F1
points on three runs; per channel: +0.0 to -0.6, and slower than ORT); the figures and the arms are in docs/int8.md,
benchmarks/study_int8.py and benchmarks/bench_int8.py.

ORT needs no hand-written kernels from us; what is written here is the glue no library does for transformers 5
models: an export with the additive attention mask that ORT's attention fusion recognises (transformers 5 builds
its mask in a form ORT does not fuse), and a check that the exported graph answers as the torch model does."""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .crf import NOTE as CRF_NOTE
from .encoding import CASE_NOTE
from .precision import cpu_features

log = logging.getLogger("loratag")

FP32_FILE = "model.onnx"
INT8_FILE = "model_quantized.onnx"  # optimum's name for a quantized model in the same folder
OPSET = 17
# ORT fuses attention for these (its "bert" optimizer covers BERT-like encoders); others export unfused
FUSED_TYPES = {"bert", "roberta", "xlm-roberta", "camembert", "electra"}
# ORT's fused SkipLayerNormalization kernel ran 5.6x slower than Add + LayerNormalization on a Zen 4 CPU (ORT 1.31,
# 3.2 ms against 0.57 ms for 64 x 48 x 384): left unfused in the file and at session load
SLOW_FUSIONS = ("SkipLayerNormFusion",)


def cpu_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX): reported beside int8
    figures, since int8 matmuls run ~2x faster with them."""
    flags, capability = cpu_features()
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags) or capability.startswith(("AVX512_VNNI", "AMX"))


@dataclass(frozen=True)
class Int8Scheme:
    """How the int8 model was made: what evaluate, predict and serve report beside their figures."""

    per_channel: bool = True
    # 7-bit weights. Without VNNI, x86 int8 kernels multiply u8 by s8 into a 16-bit sum that can saturate, and ONNX
    # Runtime's documentation advises reduce_range there; with VNNI it measured no less accurate on the validation
    # split of three BioNLP2004 models (docs/int8.md) at the same speed, so one scheme serves every CPU.
    reduce_range: bool = True
    ops: tuple[str, ...] = ("MatMul", "Attention")
    # nodes whose names contain one of these stay fp32; none by default. Leaving layer 0's feed-forward output
    # matmul in fp32 (its GELU input is where int8 loses most in BERT, El-Kurdi et al. 2022) changed 6-21% fewer
    # words on validation, but test F1 moved as much (-0.16 points on average over four runs against -0.14) and
    # int8 tagged 9% fewer sentences per second (three paired runs): docs/int8.md
    keep_float: tuple[str, ...] = ()

    def describe(self) -> dict:
        return {
            "engine": "onnxruntime",
            "weights": "int8, one scale per output channel" if self.per_channel else "int8, one scale per tensor",
            "activations": "uint8, dynamic (per batch)",
            "reduce_range": self.reduce_range,
            "cpu_vnni": cpu_vnni(),
            "quantized_ops": list(self.ops),
            "float_ops": "embeddings, LayerNorm, GELU, softmax" + "".join(f", {k}" for k in self.keep_float),
        }


class _ExportWrapper(torch.nn.Module):
    """input_ids, attention_mask (and token_type_ids, for a model trained with ``--case``) -> logits. ``additive``:
    the 2-D mask expanded into the additive 4-D one transformers 4 built (``(1 - mask) -> min where masked``), the
    pattern ORT's attention fusion matches; transformers 5 takes a 4-D mask as given, and the result is checked
    against the torch model before it is used."""

    def __init__(self, model, additive: bool):
        super().__init__()
        self.model, self.additive = model, additive

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        mask = attention_mask
        if self.additive:
            b, n = attention_mask.shape
            inverted = 1.0 - attention_mask[:, None, None, :].expand(b, 1, n, n).to(torch.float32)
            mask = inverted.masked_fill(inverted.to(torch.bool), torch.finfo(torch.float32).min)
        return self.model(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids).logits


@contextmanager
def _eager_attention(model):
    """Eager attention while exporting (SDPA exports as one opaque op ORT does not fuse), restored after."""
    before = getattr(model.config, "_attn_implementation", None)
    if before not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(before)


def _sample(vocab_size: int, pad_id: int, types: bool = False) -> tuple[torch.Tensor, ...]:
    """Two rows of different lengths (padding included), for tracing and for the check; ``types``: with token
    types of both kinds (``--case``)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, max(vocab_size, 6), (2, 24), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, 13:], mask[1, 13:] = pad_id, 0
    if not types:
        return ids, mask
    return ids, mask, torch.randint(0, 2, ids.shape, generator=gen) * mask


INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _torch_export(wrapper, sample, path: Path) -> None:
    names = list(INPUTS[: len(sample)])
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "logits"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings about Python control flow
        # dynamo=False: the TorchScript-based exporter, whose graphs ORT's transformer optimizer knows how to fuse
        torch.onnx.export(
            wrapper, sample, str(path), input_names=names, output_names=["logits"], dynamic_axes=axes,
            opset_version=OPSET, dynamo=False,
        )  # fmt: skip


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(SLOW_FUSIONS)
    )


def _run(session, *tensors: torch.Tensor) -> torch.Tensor:
    """The session's logits for ``input_ids, attention_mask[, token_type_ids]``."""
    return torch.from_numpy(session.run(["logits"], {n: t.numpy() for n, t in zip(INPUTS, tensors)})[0])


def export_fp32(model, path: Path, pad_id: int = 0, atol: float = 1e-3, types: bool = False) -> dict:
    """A merged transformers token classifier -> ``path`` (fp32 ONNX; attention, LayerNorm and GELU fused where ORT
    knows the architecture). Returns what was fused. Stops if the file answers differently from the torch model.
    ``types``: the model reads token types (``--case``), a third input."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model = model.eval().float()
    cfg = model.config
    sample = _sample(cfg.vocab_size, pad_id, types)
    with torch.inference_mode():
        expected = model(**dict(zip(INPUTS, sample))).logits
    path.parent.mkdir(parents=True, exist_ok=True)
    fusable = cfg.model_type in FUSED_TYPES
    with _eager_attention(model), torch.no_grad():
        raw = path.with_name(path.stem + ".raw.onnx")
        _torch_export(_ExportWrapper(model, additive=fusable), sample, raw)
        if fusable and not torch.allclose(_run(_session(raw, 1), *sample), expected, atol=atol):
            # an architecture that reads a 4-D mask its own way: export it as the model takes it, unfused
            log.warning("onnx: %s does not take the 4-D mask as BERT does; exported unfused", cfg.model_type)
            fusable = False
            _torch_export(_ExportWrapper(model, additive=False), sample, raw)
    fused: dict = {}
    if fusable:
        options = FusionOptions("bert")
        options.enable_skip_layer_norm = False  # see SLOW_FUSIONS
        with _quiet_root_logger():  # the optimizer's advice on tiny test vocabularies, on the root logger
            optimized = optimize_model(
                str(raw), model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size,
                optimization_options=options,
            )  # fmt: skip
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        optimized.save_model_to_file(str(path))
        raw.unlink()
    else:
        raw.replace(path)
    got = _run(_session(path, 1), *sample)
    valid = sample[1].bool()
    err = float((got - expected)[valid].abs().max())
    if err > atol:
        raise RuntimeError(f"onnx: the exported model differs from the torch model by {err:.2g} (> {atol}) in a logit")
    return {"fused": fused, "max_abs_logit_difference": err}


def _kept(path: Path, scheme: Int8Scheme) -> list[str]:
    import onnx

    if not scheme.keep_float:
        return []
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    return [n.name for n in nodes if any(k in n.name for k in scheme.keep_float)]


@contextmanager
def _quiet_root_logger():
    """ORT's quantizer advises its pre-processing step on the root logger at every call (we give it the types it
    would infer: DefaultTensorType below), and its optimizer logs its fusion notes there: noise to a user."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def quantize_int8(src: Path, dst: Path, scheme: Int8Scheme | None = None) -> Int8Scheme:
    """fp32 ONNX -> int8 weights (dynamic activations) through ORT's quantize_dynamic."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    scheme = scheme or Int8Scheme()
    with warnings.catch_warnings(), _quiet_root_logger():
        warnings.simplefilter("ignore")
        quantize_dynamic(
            str(src), str(dst), op_types_to_quantize=list(scheme.ops), per_channel=scheme.per_channel,
            reduce_range=scheme.reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=_kept(src, scheme),
            # ORT's fused ops have no shape inference in onnx; their outputs are float
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )  # fmt: skip
    return scheme


class OrtTokenClassifier:
    """An ONNX Runtime session that the Tagger calls as it calls a transformers model (``model(input_ids=...,
    attention_mask=...).logits``), so evaluate, predict and serve keep their one prediction path."""

    def __init__(self, path: Path, config=None, threads: int | None = None, describe: dict | None = None):
        self.session = _session(Path(path), threads)  # the whole model is read into memory: the file may go
        self.config = config  # the transformers config it was exported from (the Tagger reads its length limit)
        self.training = False
        self.describe = describe or {}

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def parameters(self):
        yield torch.zeros(0)  # the Tagger reads the device from the first parameter: the CPU

    def __call__(self, input_ids, attention_mask, token_type_ids=None, **kw):
        if kw.get("adapter_names") is not None:
            raise ValueError("an int8 ONNX model holds one merged adapter; it cannot take adapter_names")
        inputs = [input_ids.cpu(), attention_mask.cpu()]
        if any(i.name == "token_type_ids" for i in self.session.get_inputs()):  # a --case model
            inputs.append(torch.zeros_like(inputs[0]) if token_type_ids is None else token_type_ids.cpu())
        elif token_type_ids is not None and bool(token_type_ids.any()):
            raise ValueError("this ONNX model was exported without token types; it cannot read them")
        return SimpleNamespace(logits=_run(self.session, *inputs))


def int8_model(model, pad_id: int = 0, scheme: Int8Scheme | None = None, types: bool = False) -> OrtTokenClassifier:
    """A merged torch token classifier -> an int8 ORT model held in memory (the files go to a temporary folder).
    ``types``: the model reads token types (``--case``)."""
    with tempfile.TemporaryDirectory(prefix="loratag-onnx-") as tmp:
        fp32 = Path(tmp) / FP32_FILE
        facts = export_fp32(model, fp32, pad_id, types=types)
        scheme = quantize_int8(fp32, Path(tmp) / INT8_FILE, scheme)
        describe = {**scheme.describe(), "fused": facts["fused"]}
        return OrtTokenClassifier(Path(tmp) / INT8_FILE, model.config, describe=describe)


def export_dir(tagger, out: Path, quantize: str | None = None) -> dict:
    """A folder onnxruntime runs without loratag (and optimum's ORTModelForTokenClassification reads): model.onnx
    (fp32), model_quantized.onnx (int8, with ``quantize="int8"``), config.json with id2label, the tokenizer, and
    onnx.json saying how the files were made. The fused ops (Attention, BiasGelu ...) are ONNX Runtime's own."""
    from .rundir import write_json

    model = tagger.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if not isinstance(model, torch.nn.Module):
        raise ValueError("export --onnx needs the float model: load the run without --quantize")
    out.mkdir(parents=True, exist_ok=True)
    model.config.id2label, model.config.label2id = tagger.labels.id2label, tagger.labels.label2id
    facts = export_fp32(model, out / FP32_FILE, tagger.tokenizer.pad_token_id or 0, types=tagger.case)
    record = {
        "files": {"fp32": FP32_FILE},
        "inputs": list(INPUTS if tagger.case else INPUTS[:2]),
        "outputs": ["logits"],
        "fused": facts["fused"],
        "max_abs_logit_difference_vs_torch": facts["max_abs_logit_difference"],
        "max_length": tagger.max_length,
        "labels": list(tagger.labels.labels),
        "decode": tagger.decode,
        "word_label": "each word's label is the label of its first sub-token",
    }
    if tagger.case:
        record["token_type_ids"] = CASE_NOTE
    if tagger.labels.transitions is not None:  # the CRF's scores, for a decoder outside loratag
        record["crf"] = {"note": CRF_NOTE, **tagger.labels.transitions.to_dict(tagger.labels.labels)}
    if quantize == "int8":
        scheme = quantize_int8(out / FP32_FILE, out / INT8_FILE)
        record["files"]["int8"] = INT8_FILE
        record["int8"] = scheme.describe()
    model.config.save_pretrained(out)
    # the base's tokenizer.json may pad and truncate every text to a fixed length (all-MiniLM-L6-v2's: 128), which a
    # user of the tokenizers library would meet as words silently dropped; loratag windows long sentences itself
    tokenizer = copy.deepcopy(tagger.tokenizer)
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.save_pretrained(out)
    record["tokenizer"] = (
        f"tokenizer.json neither pads nor truncates: a sentence over {tagger.max_length} sub-tokens needs windows "
        "(loratag predict runs overlapping ones)"
    )
    write_json(out / "onnx.json", record)
    return record
