"""Verify an exported LLaVA .pte: the runner's contract, and numerics against the eager models.

    python -m llava_pipeline.test_pte outputs/llava.pte [--tokenizer_path T] [--outputs DIR]
                                      [--steps 40] [--no-fp32]

Checks, one table row each (method, metric, value, threshold, status):

1. Provenance. The .pte's sha256 equals `emit/manifest.json`'s record of `llava.pte`, and the
   manifests chain emit -> to_executorch -> partition -> quantize -> source_transform (each
   stage's recorded input equals its upstream's manifest/output), so the eager models rebuilt
   from `quantize/` and `source_transform/` are the ones this program was lowered from.
2. What ExecuTorch's MultimodalRunner needs: methods `vision_encoder`, `token_embedding`,
   `text_decoder` and `get_max_seq_len` (a missing `get_max_context_len` / `get_eos_ids` is a
   WARN: the runner has defaults); constant values equal to the model's (cache length, EOS ids);
   input/output dtypes and shapes from `method_meta` (vision uint8 [1, 3, H, W] -> float32
   [1, N_img, D]; token_embedding int64 [1, S] -> float32 [1, S, D]; text_decoder float32
   [1, S, D] + int64 [1] -> float32 [1, V]; dynamic S reported at its upper bound); and that
   the tokenizer (llama2c `tokenizer.bin`) has exactly V ids, V the decoder's logit width.
3. Numerics, each .pte method against the eager 8da4w (or fp32) model from `quantize/` on the
   same inputs: the image (`image.pt` beside the .pte, else a seeded random one), every id of
   the vocabulary (in chunks, so a damaged row anywhere shows), and the decoder on a chunked
   prefill (text at position 0, the image embeddings, text after) then `steps` single-token
   decode steps along the .pte's own greedy path, the eager model teacher-forced along the same
   tokens from freshly reset caches (one loaded program throughout: its KV cache is state). The decoder is
   fed the eager model's embeddings so that its rows measure the decoder alone. Top-1
   agreement with the fp32 model from `source_transform/` is informational (INFO).

The prompt is the LLaVA-1.5 one ("USER: <image>\\nWhat is shown in this picture? ASSISTANT:")
when the tokenizer passed its check, else seeded token ids.

The program runs in a child process (`Program`): a corrupted .pte can abort or segfault inside
the runtime (seen when flipping bytes in its flatbuffer), which must not take the verifier down;
a crash becomes a FAIL row (while running) or exit 2 (while loading).

Thresholds. σ is the standard deviation of the eager reference output being compared. Measured
on the built-in tiny model (torch 2.13, executorch 1.5.1, 40 decode steps, LLaVA prompt and
coffee.jpg; a seeded random prompt gave the same within the ranges below):

| quant.scheme | row | measured | threshold |
|---|---|---|---|
| any | vision_encoder max abs diff (quant.vision=none: fp32) | 2.9e-6 (σ 1.24) | 1e-3·σ |
| any | vision_encoder max abs diff (quant.vision=8da8w, random images) | 0.017 - 0.044·σ | 0.25·σ |
| any | token_embedding max abs diff (fp32 or int8 rows, same dequant) | 0.0 (σ 2.0) | 1e-3·σ |
| none | text_decoder logits max abs diff | 1.3e-5 - 2.1e-5 (σ ~9.5) | 1e-3·σ (~9e-3) |
| 8da4w | text_decoder logits max abs diff | 0.30 - 0.56 (σ ~9.4, 0.03-0.06·σ) | 0.25·σ (~2.3) |
| none | top-1 agreement vs eager | 1.0 (41/41) | 0.95 |
| 8da4w | top-1 agreement vs eager 8da4w | 0.976 - 1.0 | 0.90 |
| 8da4w | top-1 agreement vs fp32 (INFO) | 0.66 - 0.71 | none |

fp32 XNNPACK differs from eager PyTorch by summation order only (~1e-6 relative); 1e-3·σ leaves
room for deeper models (7B) while a wrong weight, cache slot or normalisation moves outputs by
O(σ). 8da4w differs by XNNPACK's vs torchao's rounding of the dynamically quantized
activations; the flips seen were near-ties (top-2 margin 0.035). Another export's .pte against
these manifests (other seed) gives logit differences of several σ and ~0 agreement.

Exit status: 0 every row passes, 1 some row fails, 2 nothing could be verified (missing or
unloadable .pte, missing manifest or model): one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path

from . import tokenizer as tok_mod
from .errors import PipelineError
from .files import read_json, sha256_file
from .runner import load_kernels, native_output_captured

METHODS = ("vision_encoder", "token_embedding", "text_decoder")
REQUIRED = (*METHODS, "get_max_seq_len")
OPTIONAL = ("get_max_context_len", "get_eos_ids")
QUESTION = "What is shown in this picture?"
# ExecuTorch ScalarType codes that method_meta reports.
DTYPES = {0: "uint8", 1: "int8", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 11: "bool",
          15: "bfloat16"}
CALL_TIMEOUT_S = 600


class VerifyError(PipelineError):
    """Nothing can be verified (missing/unloadable .pte, missing manifest): exit 2, one line."""


@dataclass(frozen=True)
class Tolerances:
    float_rel: float  # vision / embedding outputs: max abs diff <= float_rel * σ
    logits_rel: float  # decoder logits: max abs diff <= logits_rel * σ
    top1: float  # teacher-forced top-1 agreement with the eager model, at least
    vision_rel: float = 1e-3  # vision_encoder output: max abs diff <= vision_rel * σ


TOLERANCES = {"none": Tolerances(1e-3, 1e-3, 0.95), "8da4w": Tolerances(1e-3, 0.25, 0.90)}
# By quant.vision: an int8 vision tower differs by XNNPACK's vs torchao's rounding of its
# dynamically quantized activations, like the 8da4w decoder.
VISION_TOLERANCES = {"none": 1e-3, "8da8w": 0.25}


@dataclass
class Row:
    method: str
    metric: str
    value: str
    threshold: str
    status: str  # PASS, FAIL, WARN (not failing), INFO (not judged)


@dataclass
class Report:
    """The verification result: `ok` is true when no row has status FAIL."""

    pte: Path
    rows: list[Row] = field(default_factory=list)

    def add(self, method: str, metric: str, value, threshold: str, passed: bool | None) -> Row:
        status = "INFO" if passed is None else ("PASS" if passed else "FAIL")
        row = Row(method, metric, value if isinstance(value, str) else _fmt(value), threshold, status)
        self.rows.append(row)
        return row

    def warn(self, method: str, metric: str, value: str, threshold: str = "") -> None:
        self.rows.append(Row(method, metric, value, threshold, "WARN"))

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "FAIL"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def table(self) -> str:
        head = Row("method", "metric", "value", "threshold", "status")
        cells = [[r.method, r.metric, r.value, r.threshold, r.status] for r in (head, *self.rows)]
        widths = [max(len(c[i]) for c in cells) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"
    return str(x)


# ------------------------------------------------------------------ the program, out of process

# The child: `python -c CHILD <socket fd> <pte>`, its stdout/stderr going to a log file.
CHILD = "import sys; from llava_pipeline.test_pte import _serve; _serve(int(sys.argv[1]), sys.argv[2])"


def _serve(fd: int, pte: str) -> None:
    """Child process: load the .pte and send ("ok", `_describe` of it) or ("error", why), then
    answer (method, numpy inputs) requests with ("ok", numpy outputs) or ("error", why) until None."""
    from multiprocessing.connection import Connection

    import torch

    conn = Connection(fd)
    try:
        load_kernels()
        from executorch.extension.pybindings.portable_lib import _load_for_executorch

        module = _load_for_executorch(pte)
        conn.send(("ok", _describe(module)))
    except Exception as e:
        conn.send(("error", str(e)))
        return
    while (request := conn.recv()) is not None:
        method, inputs = request
        try:
            outs = module.run_method(method, tuple(torch.from_numpy(x) for x in inputs))
            conn.send(("ok", [o.numpy().copy() for o in outs]))  # outputs alias planned memory
        except Exception as e:
            conn.send(("error", str(e)))


def _describe(module) -> dict:
    """Method names, tensor metas of the runner methods and the constant methods' values."""
    names = list(module.method_names())
    metas, constants = {}, {}
    for name in names:
        if name in METHODS:
            mm = module.method_meta(name)

            def info(t):
                return DTYPES.get(t.dtype(), f"dtype{t.dtype()}"), list(t.sizes())

            metas[name] = {
                "inputs": [info(mm.input_tensor_meta(i)) for i in range(mm.num_inputs())],
                "outputs": [info(mm.output_tensor_meta(i)) for i in range(mm.num_outputs())],
            }
        elif module.method_meta(name).num_inputs() == 0:
            constants[name] = list(module.run_method(name, ()))
    return {"methods": names, "metas": metas, "constants": constants}


class ProgramCrashed(RuntimeError):
    """The child running the .pte died (signal, exit or timeout) during a call."""


class Program:
    """A .pte loaded by ExecuTorch's pybindings in a child process (crash-isolated).

    Loading starts at construction; `wait_loaded()` returns `_describe`'s dict (also kept as
    `describe`) or raises VerifyError if the program does not load. `run(method, *tensors)`
    returns the method's outputs as tensors; raises RuntimeError for a runtime error,
    ProgramCrashed if the child died (then every later call raises it too). `close()` ends it.
    """

    def __init__(self, pte: Path):
        parent, child = socket.socketpair()
        self._log = tempfile.TemporaryFile()
        env = dict(os.environ)  # the child must import this package as the parent did
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(child.fileno()), str(pte)],
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, env=env,
        )
        child.close()
        self._conn = Connection(parent.detach())
        self._dead: str | None = None
        self.pte = pte
        self.describe: dict = {}

    def wait_loaded(self) -> dict:
        try:
            status, payload = self._call("loading")
        except ProgramCrashed as e:
            raise VerifyError(f"{self.pte}: not a loadable ExecuTorch program ({e})") from None
        if status != "ok":
            reason = self.log_error() or payload
            raise VerifyError(f"{self.pte}: not a loadable ExecuTorch program ({reason})")
        self.describe = payload
        return payload

    def run(self, method: str, *inputs):
        import torch

        status, payload = self._call(method, (method, [t.contiguous().numpy() for t in inputs]))
        if status != "ok":
            raise RuntimeError(f"{payload} {self.log_error()}".strip())
        return [torch.from_numpy(x) for x in payload]

    def _call(self, what: str, request=None):
        """Send `request` (if any) and return the child's answer; ProgramCrashed if it died."""
        if self._dead:
            raise ProgramCrashed(self._dead)
        try:
            if request is not None:
                self._conn.send(request)
            if not self._conn.poll(CALL_TIMEOUT_S):
                self._proc.kill()
                self._dead = f"runtime process killed: {what} took over {CALL_TIMEOUT_S} s"
                raise ProgramCrashed(self._dead)
            return self._conn.recv()
        except (EOFError, ConnectionError):
            try:
                code = self._proc.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            how = signal.Signals(-code).name if code is not None and code < 0 else f"exit {code}"
            self._dead = f"runtime process died in {what} ({how})"
            raise ProgramCrashed(self._dead) from None

    def log_error(self) -> str:
        """The last error-looking line the runtime logged (it logs `[file.cpp:N] message`)."""
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").splitlines()
        hits = [ln for ln in lines if ln.startswith("[") and ".cpp:" in ln and "temp allocator" not in ln]
        return hits[-1].split("] ", 1)[-1] if hits else ""

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._conn.send(None)
                self._proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._conn.close()
        self._log.close()


# ------------------------------------------------------------------ provenance

# (downstream stage, key path of its recorded input, upstream stage, what of upstream it names)
LINKS = (
    ("emit", ("inputs", "program"), "to_executorch", ("outputs", "model.pte")),
    ("to_executorch", ("inputs", "edge_programs", "manifest.json"), "partition", None),
    ("partition", ("inputs", "quantized_model", "manifest.json"), "quantize", None),
    ("quantize", ("inputs", "model", "manifest.json"), "source_transform", None),
)


def _dig(d, keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def check_provenance(report: Report, pte: Path, outputs: Path) -> dict:
    """Rows for the .pte hash and the manifest chain; returns the manifests by stage.
    Raises VerifyError if emit, quantize or source_transform has no manifest."""
    manifests = {}
    for name in ("emit", "quantize", "source_transform", "to_executorch", "partition"):
        path = outputs / name / "manifest.json"
        if path.is_file():
            manifests[name] = read_json(path)
        elif name in ("emit", "quantize", "source_transform"):
            raise VerifyError(f"{path}: missing (pass the pipeline's outputs folder with --outputs)")
    want = _dig(manifests["emit"], ("outputs", "llava.pte"))
    got = sha256_file(pte)
    same = got == want
    report.add("program", "sha256 == emit manifest's llava.pte", got[:12],
               (want or "none recorded")[:12], same)
    broken, unchecked = [], []
    for down, keys, up, names in LINKS:
        if down not in manifests or up not in manifests:
            unchecked.append(f"{down}->{up}")
            continue
        recorded = _dig(manifests[down], keys)
        actual = _dig(manifests[up], names) if names else sha256_file(outputs / up / "manifest.json")
        if recorded != actual:
            broken.append(f"{down}->{up}")
    value = f"{len(LINKS) - len(broken) - len(unchecked)}/{len(LINKS)} links match"
    if broken:
        report.add("program", "manifest chain emit..source_transform", f"broken: {', '.join(broken)}",
                   "all links", False)
    elif unchecked:
        report.warn("program", "manifest chain emit..source_transform", f"{value}; no manifest for "
                    f"{', '.join(unchecked)}", "all links")
    else:
        report.add("program", "manifest chain emit..source_transform", value, "all links", True)
    return manifests


# ------------------------------------------------------------------ the runner's contract


@dataclass(frozen=True)
class AtLeast:
    """A dynamic dimension, reported at its upper bound, that must be at least `n`."""

    n: int

    def __str__(self) -> str:
        return f"S>={self.n}"


def _spec_ok(got, want) -> bool:
    (dtype, sizes), (wdtype, wsizes) = got, want
    return dtype == wdtype and len(sizes) == len(wsizes) and all(
        s >= w.n if isinstance(w, AtLeast) else s == w for s, w in zip(sizes, wsizes)
    )


def _spec_str(spec) -> str:
    dtype, sizes = spec
    return f"{dtype} [{', '.join(str(s) for s in sizes)}]"


def check_contract(report: Report, desc: dict, args) -> int | None:
    """Rows for methods, constants and tensor metas; returns the logit width (None if unknown)."""
    names = set(desc["methods"])
    missing = [m for m in REQUIRED if m not in names]
    report.add("program", "required methods", f"missing {missing}" if missing else "all present",
               ", ".join(REQUIRED), not missing)
    consts = desc["constants"]
    seq = args.text.max_seq_len
    eos = list(args.text.eos_token_ids)
    expect = {  # name: (check, threshold text)
        "get_max_seq_len": (lambda v: v == [seq], f"== [{seq}]"),
        "get_max_context_len": (lambda v: len(v) == 1 and 0 < v[0] <= seq, f"<= [{seq}] (the cache)"),
        "get_eos_ids": (lambda v: v == eos, f"== {eos}"),
    }
    for name, (ok, text) in expect.items():
        if name in consts:
            report.add(name, "value", str(consts[name]), text, ok(consts[name]))
        elif name in OPTIONAL:
            report.warn(name, "value", "absent (runner uses its default)", text)

    from .runner_image import MAX_CHANNELS  # imports torch, which this module's top level does not

    v, t = args.vision, args.text
    n_img, d, vocab = v.num_image_tokens, t.hidden_size, t.vocab_size
    text_room = seq - n_img  # longest text chunk the context can hold
    specs = {
        # The input's bounds: 1..4 channels, sides 1..image_size (runner_image.py).
        "vision_encoder": ([("uint8", [1, MAX_CHANNELS, v.image_size, v.image_size])],
                           [("float32", [1, n_img, d])]),
        "token_embedding": ([("int64", [1, AtLeast(text_room)])], [("float32", [1, AtLeast(text_room), d])]),
        "text_decoder": ([("float32", [1, AtLeast(n_img), d]), ("int64", [1])], [("float32", [1, vocab])]),
    }
    width = None
    for method, (inputs, outputs) in specs.items():
        meta = desc["metas"].get(method)
        if meta is None:
            continue  # already failed as a missing method
        for kind, wants, gots in (("input", inputs, meta["inputs"]), ("output", outputs, meta["outputs"])):
            for i, want in enumerate(wants):
                got = gots[i] if i < len(gots) else None
                report.add(method, f"{kind} {i}", _spec_str(got) if got else "absent", _spec_str(want),
                           got is not None and _spec_ok(got, want))
            if len(gots) > len(wants):
                report.add(method, f"{kind}s", f"{len(gots)}", f"{len(wants)}", False)
    outs = desc["metas"].get("text_decoder", {}).get("outputs")
    if outs:
        width = outs[0][1][-1]
    return width


def check_tokenizer(report: Report, path: Path | None, width: int | None):
    """Row for the tokenizer's vocab vs the logit width; returns the loaded tokenizer if it
    covers exactly the model's vocab, else None."""
    if path is None:
        report.warn("tokenizer", "vocab_size", "no tokenizer.bin beside the .pte: not checked")
        return None
    from pytorch_tokenizers import CppLlama2cTokenizer

    tok = CppLlama2cTokenizer()
    try:
        tok.load(str(path))
        size = tok.vocab_size()
    except RuntimeError as e:
        size = f"unreadable ({e})"
    passed = size == width
    report.add("tokenizer", "vocab_size == text_decoder logit width", str(size), f"== {width}", passed)
    return tok if passed else None


# ------------------------------------------------------------------ numerics


def _image(report: Report, pte: Path, args):
    """uint8 [1, 3, H, W]: image.pt beside the .pte when valid, else seeded noise."""
    import torch

    v = args.vision
    shape = (v.num_channels, v.image_size, v.image_size)
    path = pte.parent / "image.pt"
    if path.is_file():
        try:
            pixels = torch.load(path, weights_only=True)
        except Exception:
            pixels = None
        if isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8 and pixels.shape[-3:] == shape:
            return pixels.reshape(1, *shape), "image.pt"
        report.add("image.pt", "uint8 CHW of the model's size", "unreadable or wrong shape",
                   _spec_str(("uint8", list(shape))), False)
    noise = torch.randint(0, 256, (1, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return noise, "seeded noise"


def _prompt(tok, args) -> tuple[list[int], list[int]]:
    """Token ids before and after the image: the LLaVA prompt if a good tokenizer is at hand."""
    import torch

    if tok is not None:
        return tok_mod.runner_prompt_token_segments(tok, QUESTION)
    g = torch.Generator().manual_seed(0)
    hi = min(args.text.vocab_size, args.image_token_index)
    return [args.text.bos_token_id, *torch.randint(3, hi, (5,), generator=g).tolist()], \
        torch.randint(3, hi, (8,), generator=g).tolist()


def _max_diff_row(report, method, metric, got, ref, rel: float, rel_name: str) -> None:
    sigma = float(ref.float().std())
    diff = float((got.float() - ref.float()).abs().max())
    limit = rel * sigma
    report.add(method, metric, diff, f"<= {_fmt(limit)} ({rel_name}*σ, σ={sigma:.3g})", diff <= limit)


def _decode_pte(program, embed, chunks, steps):
    """Prefill `chunks` then greedy-decode `steps` tokens with the .pte; returns
    (logits per chunk and step, greedy token after each)."""
    import torch

    pos, logits = 0, []
    for x in chunks:
        logits.append(program.run("text_decoder", x, torch.tensor([pos]))[0])
        pos += x.shape[1]
    tokens = [int(logits[-1].argmax())]
    for _ in range(steps):
        x = embed(torch.tensor([[tokens[-1]]]))
        logits.append(program.run("text_decoder", x, torch.tensor([pos]))[0])
        tokens.append(int(logits[-1].argmax()))
        pos += 1
    return logits, tokens


def decode_eager(model, chunks, tokens):
    """The eager decoder from reset caches over `chunks`, then teacher-forced on `tokens[:-1]`."""
    import torch

    model.reset_buffers()
    decoder, pos, logits = model.text_decoder, 0, []
    for x in chunks:
        logits.append(decoder(x, torch.tensor([pos])))
        pos += x.shape[1]
    for tok in tokens[:-1]:
        logits.append(decoder(model.token_embedding(torch.tensor([[tok]])), torch.tensor([pos])))
        pos += 1
    return logits


def prefill_chunks(model, before, pixels, after, vision=None):
    """Decoder inputs of the prefill: embedded text before, image embeddings, text after."""
    import torch

    image = vision if vision is not None else model.vision_encoder(pixels)
    parts = [model.token_embedding(torch.tensor([before])), image]
    if after:
        parts.append(model.token_embedding(torch.tensor([after])))
    return parts


def check_numerics(report, program, quant_model, fp32_model, args, tol, scheme, pixels, image_name,
                   before, after, steps, vision_scheme: str = "none") -> None:
    """Rows comparing each method of the .pte with the eager models (see module docstring)."""
    import torch

    def attempt(method, body):
        try:
            with torch.no_grad():
                body()
        except Exception as e:  # a runtime error or crash of the program is a failing row
            report.add(method, "run", f"error: {str(e)[:120]}", "runs", False)

    with torch.no_grad():
        ref_image = quant_model.vision_encoder(pixels)

    def check_vision():
        got = program.run("vision_encoder", pixels)[0]
        _max_diff_row(report, "vision_encoder", f"max|diff| vs eager ({image_name})", got, ref_image,
                      tol.vision_rel, f"{tol.vision_rel:g}")
        if fp32_model is not None and vision_scheme != "none":
            ref32 = fp32_model.vision_encoder(pixels)
            d = float((ref_image - ref32).abs().max()) / float(ref32.std())
            report.add("vision_encoder", "eager quantized vs fp32 (INFO)", f"max|diff| {d:.3g}*σ", "none", None)

    def embedding():
        # Every id, in chunks as long as the method takes: a corrupted row anywhere shows.
        vocab = args.text.vocab_size
        ids = torch.arange(vocab).view(1, -1)
        chunk = program.describe["metas"]["token_embedding"]["inputs"][0][1][-1]
        got = torch.cat([program.run("token_embedding", c)[0] for c in ids.split(chunk, dim=1)], dim=1)
        _max_diff_row(report, "token_embedding", f"max|diff| vs eager (all {vocab} ids)", got,
                      quant_model.token_embedding(ids), tol.float_rel, f"{tol.float_rel:g}")

    def decoder():
        chunks = prefill_chunks(quant_model, before, pixels, after, vision=ref_image)
        used = sum(x.shape[1] for x in chunks)
        n = max(0, min(steps, args.text.max_seq_len - used))
        got, tokens = _decode_pte(program, quant_model.token_embedding, chunks, n)
        ref = decode_eager(quant_model, chunks, tokens)
        k = len(chunks)
        layout = "+".join(str(x.shape[1]) for x in chunks)
        _max_diff_row(report, "text_decoder", f"prefill logits max|diff| (chunks {layout})",
                      torch.cat(got[:k]), torch.cat(ref[:k]), tol.logits_rel, f"{tol.logits_rel:g}")
        if n:
            _max_diff_row(report, "text_decoder", f"decode logits max|diff| ({n} steps)",
                          torch.cat(got[k:]), torch.cat(ref[k:]), tol.logits_rel, f"{tol.logits_rel:g}")
        # A flip between two tokens whose eager logits are closer than twice the allowed
        # logit error is within tolerance by definition (each logit may move by that much);
        # top-1 agreement is required where the eager choice is decisive.
        steps_ref = ref[k - 1:]
        limit = tol.logits_rel * float(torch.cat(ref).float().std())
        eager_top1 = [int(x.argmax()) for x in steps_ref]
        margins = [float(x.float().topk(2).values.flatten()[0] - x.float().topk(2).values.flatten()[1])
                   if x.numel() > 1 else float("inf") for x in steps_ref]
        decisive = [i for i, m in enumerate(margins) if m > 2 * limit]
        agree_all = sum(a == b for a, b in zip(tokens, eager_top1)) / len(tokens)
        if decisive:
            agree = sum(tokens[i] == eager_top1[i] for i in decisive) / len(decisive)
            report.add("text_decoder", f"top-1 agreement vs eager {scheme} ({len(decisive)} of {len(tokens)} "
                       f"positions with margin > 2*{tol.logits_rel:g}*σ; all: {agree_all:.3f})",
                       f"{agree:.3f}", f">= {tol.top1}", agree >= tol.top1)
        else:
            report.warn("text_decoder", f"top-1 agreement vs eager {scheme} ({len(tokens)} positions, "
                        f"none with margin > 2*{tol.logits_rel:g}*σ)", f"{agree_all:.3f}", f">= {tol.top1}")
        if fp32_model is not None:
            fp_ref = decode_eager(fp32_model, prefill_chunks(fp32_model, before, pixels, after), tokens)
            fp_top1 = [int(x.argmax()) for x in fp_ref[k - 1:]]
            agree = sum(a == b for a, b in zip(tokens, fp_top1)) / len(tokens)
            report.add("text_decoder", f"top-1 agreement vs fp32 ({len(tokens)} positions)",
                       f"{agree:.3f}", "informational", None)

    attempt("vision_encoder", check_vision)
    attempt("token_embedding", embedding)
    attempt("text_decoder", decoder)


# ------------------------------------------------------------------ entry points


def verify(pte_path, tokenizer_path=None, outputs_dir=None, steps: int = 40,
           compare_fp32: bool = True) -> Report:
    """Verify `pte_path` against the pipeline folder `outputs_dir` (default: the .pte's folder).

    `tokenizer_path` None means `tokenizer.bin` beside the .pte if there is one (else the
    tokenizer row is a WARN); `image.pt` is also looked for beside the .pte, so emit can call
    `verify(out / "llava.pte", None, outputs)` on its finished folder before publishing.
    Returns a Report whose `.ok` is false if any row failed; prints nothing (the runtime's
    native logs are captured). Raises VerifyError (a PipelineError) when nothing can be
    verified: missing or unloadable .pte, an explicitly given tokenizer that does not exist,
    missing manifests or eager models.
    """
    pte = Path(pte_path)
    outputs = Path(outputs_dir) if outputs_dir is not None else pte.parent
    if not pte.is_file():
        raise VerifyError(f"{pte}: no such file")
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise VerifyError(f"{tokenizer_path}: no such tokenizer file")
    with open(pte, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:6] != b"ET":
        raise VerifyError(f"{pte}: not an ExecuTorch program (no 'ET' file identifier)")
    with native_output_captured():  # the runtime and the custom ops log natively on fds 1 and 2
        return _verify(pte, tokenizer_path, outputs, steps, compare_fp32)


def _verify(pte: Path, tokenizer_path, outputs: Path, steps: int, compare_fp32: bool) -> Report:
    report = Report(pte)
    manifests = check_provenance(report, pte, outputs)
    quant = manifests["quantize"].get("config", {}).get("quant", {})
    scheme, vision = quant.get("scheme"), quant.get("vision", "none")
    if scheme not in TOLERANCES or vision not in VISION_TOLERANCES:
        raise VerifyError(f"{outputs / 'quantize/manifest.json'}: unknown quant scheme "
                          f"{scheme!r} (vision {vision!r})")
    tol = replace(TOLERANCES[scheme], vision_rel=VISION_TOLERANCES[vision])
    program = Program(pte)  # starts loading in the child while the eager models load here
    try:
        from . import model_io  # torch and transformers: not at this module's top level

        load_kernels()  # the eager models call the custom LLM and quantized ops too
        try:
            quant_model, args, _ = model_io.load_quantized(outputs / "quantize")
            fp32_model = model_io.load_transformed(outputs / "source_transform") if compare_fp32 else None
            eager_error = None
        except Exception as e:  # torch.load / safetensors / state-dict errors vary
            eager_error = str(e).splitlines()[0] if str(e) else type(e).__name__
        desc = program.wait_loaded()  # an unloadable .pte is the first thing to report
        if eager_error:
            raise VerifyError(f"{outputs}: cannot rebuild the eager models ({eager_error})")
        width = check_contract(report, desc, args)
        if tokenizer_path is None and (pte.parent / "tokenizer.bin").is_file():
            tokenizer_path = pte.parent / "tokenizer.bin"
        tok = check_tokenizer(report, Path(tokenizer_path) if tokenizer_path else None, width)
        if all(m in desc["methods"] for m in METHODS):
            pixels, image_name = _image(report, pte, args)
            before, after = _prompt(tok, args)
            check_numerics(report, program, quant_model, fp32_model, args, tol, scheme,
                           pixels, image_name, before, after, steps, vision)
    finally:
        program.close()
    return report


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llava_pipeline.test_pte",
                                description=__doc__.split("\n")[0])
    p.add_argument("pte", type=Path, help="the exported program (outputs/llava.pte)")
    p.add_argument("--tokenizer_path", type=Path, help="default: tokenizer.bin beside the .pte")
    p.add_argument("--outputs", type=Path, help="the pipeline's outputs folder (default: the .pte's folder)")
    p.add_argument("--steps", type=int, default=40, help="teacher-forced decode steps after the prefill")
    p.add_argument("--no-fp32", action="store_true", help="skip the (informational) fp32 comparison")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI: print the table; 0 if every row passes, 1 if one fails, 2 if nothing could be verified."""
    import logging
    import time
    import warnings

    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.disable(logging.WARNING)  # torch/torchao import chatter
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    try:
        report = verify(args.pte, args.tokenizer_path, args.outputs, args.steps, not args.no_fp32)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        logging.disable(logging.NOTSET)
    print(report.table())
    failed = report.failed
    verdict = "OK" if not failed else f"FAILED: {', '.join(f'{r.method} {r.metric}' for r in failed)}"
    print(f"\n{args.pte}: {verdict} ({time.perf_counter() - t0:.1f} s)")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
