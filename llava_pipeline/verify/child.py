"""The .pte under test, loaded by ExecuTorch's pybindings in a child process (`Program`).

A corrupted .pte can abort or segfault inside the runtime (seen when flipping bytes in its
flatbuffer), which must not take the verifier down: a crash while running a method becomes
ProgramCrashed (a FAIL row), one while loading a VerifyError (exit 2). Parent and child talk
over a socket pair: the child sends `describe()` of the loaded program, then answers
(method, numpy inputs) requests with numpy outputs until it receives None.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path

from llava_pipeline.base.methods import METHODS
from llava_pipeline.runtime.runner import load_kernels
from llava_pipeline.verify.report import VerifyError

# ExecuTorch ScalarType codes that method_meta reports.
DTYPES = {0: "uint8", 1: "int8", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 11: "bool", 15: "bfloat16"}
CALL_TIMEOUT_S = 600

# The child: `python -c CHILD <socket fd> <pte>`, its stdout/stderr going to a log file.
CHILD = "import sys; from llava_pipeline.verify.child import serve; serve(int(sys.argv[1]), sys.argv[2])"


def serve(fd: int, pte: str) -> None:
    """Child process: load the .pte and send ("ok", `describe` of it) or ("error", why), then
    answer (method, numpy inputs) requests with ("ok", numpy outputs) or ("error", why) until None."""
    import torch

    conn = Connection(fd)
    try:
        load_kernels()
        from executorch.extension.pybindings.portable_lib import _load_for_executorch

        module = _load_for_executorch(pte)
        conn.send(("ok", describe(module)))
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


def describe(module) -> dict:
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

    Loading starts at construction; `wait_loaded()` returns `describe`'s dict (also kept as
    `describe`) or raises VerifyError if the program does not load. `run(method, *tensors)`
    returns the method's outputs as tensors; raises RuntimeError for a runtime error,
    ProgramCrashed if the child died (then every later call raises it too). `close()` ends it.
    """

    def __init__(self, pte: Path):
        parent, child = socket.socketpair()
        self._log = tempfile.TemporaryFile()
        env = dict(os.environ)  # the child must import this package as the parent did
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(child.fileno()), str(pte)],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=env,
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
