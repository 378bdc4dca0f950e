"""One AWQ W4A16 quantization, as its own process.

    python -m yapd.awq.job --model ORG/NAME_OR_DIR --out DIR [--role chat|tool] [--group-size 128]
        [--samples 128] [--max-len 512] [--calibration-file FILE] [--device auto|cpu|cuda:0]
        [--push-repo ORG/NAME-AWQ ...]

The daemon runs this with its own interpreter (or ``awq.python``) so that hours of
calibration never hold its event loop or its GIL; operators can run it by hand on any
machine. Progress goes to stdout as JSON lines (``{"event": "progress", "stage": ...,
"layer": i, "layers": n, "elapsed_s", "eta_s", "message"}``), ending with one
``{"event": "result", ...}`` or ``{"event": "error", "error": ...}``; everything the
libraries print goes to stderr. The token for --push-repo comes from HF_TOKEN only
(command lines are visible to every user in ``ps``).

Library: llmcompressor's AWQ (see docs/awq.md for why not AutoAWQ). The output is a
compressed-tensors ``pack-quantized`` checkpoint that vLLM detects from config.json.

Exit codes: 0 built (and pushed, if asked); 1 failed, nothing written; 2 bad arguments
or settings; 3 built and cached, but the push failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from yapd import __version__
from yapd.awq import METADATA_FILE, METADATA_VERSION, AwqError, AwqSettingsError, cleanup, commit, scrub, tmp_path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PUSH_FAILED = 0, 1, 2, 3
# Files of a source checkpoint that describe its tokenizer: copied verbatim, so the
# quantized model reads text exactly as the float one did.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json", "tekken.json")
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]

Emit = Callable[..., None]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m yapd.awq.job", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="float model: Hub repo id or local directory")
    p.add_argument("--revision", default="", help="Hub revision (branch, tag or commit) of --model")
    p.add_argument("--out", help="finished checkpoint directory (default: <cache-dir>/awq/<model-slug>)")
    p.add_argument("--cache-dir", help="yapd's cache directory, for the default --out")
    p.add_argument("--role", choices=("chat", "tool"), default="chat",
                   help="how the built-in calibration text is rendered (chat: persona + dialogue; tool: tool prompt)")
    p.add_argument("--bits", type=int, default=4, choices=(4,))
    p.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128))
    p.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per calibration sample at most (default 512)")
    p.add_argument("--calibration-file", default="",
                   help="your own calibration text: .jsonl ({\"text\"} or {\"messages\"}) or one sample a line")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, or cuda:N")
    p.add_argument("--push-repo", default="", help="also upload the result to this Hub repo (token: HF_TOKEN)")
    p.add_argument("--push-branch", default="main")
    p.add_argument("--push-private", action=argparse.BooleanOptionalAction, default=True,
                   help="create the repo private (only when it is created)")
    p.add_argument("--push-allow-create", action="store_true", help="create the repo when it does not exist")
    p.add_argument("--push-commit-message", default="yapd: AWQ W4A16 model")
    p.add_argument("--hub-endpoint", default="", help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    return p


class Events:
    """JSON lines on the real stdout; fd 1 itself is pointed at stderr, so libraries
    that print cannot corrupt the event stream."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.t0 = time.monotonic()
        self._out: IO[str] = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        sys.stdout.flush()
        os.dup2(2, 1)

    def send(self, event: str, **fields: Any) -> None:
        msg = {"event": event, "role": self.role, **fields}
        self._out.write(json.dumps(msg, separators=(",", ":"), default=str) + "\n")
        self._out.flush()

    def progress(self, stage: str, message: str = "", **fields: Any) -> None:
        self.send("progress", stage=stage, message=message, elapsed_s=round(time.monotonic() - self.t0, 1),
                  **fields)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _die_with_parent() -> None:
    """Linux: SIGTERM us when the daemon that started us dies, even by SIGKILL."""
    parent = os.environ.get("YAPD_AWQ_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != int(parent):  # it died before prctl: nobody to work for
            os._exit(EXIT_FAILED)


def _on_sigterm(signum: int, frame: Any) -> None:
    # A second SIGTERM must not interrupt the cleanup the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(143)


def resolve_source(model: str, revision: str) -> tuple[Path, str | None]:
    """A local directory with the float checkpoint, and the Hub commit it came from."""
    local = Path(model).expanduser()
    if local.is_dir():
        # A Hugging Face cache snapshot directory is named after its commit.
        rev = local.resolve().name if local.resolve().parent.name == "snapshots" else None
        return local.resolve(), rev
    from huggingface_hub import snapshot_download

    path = Path(snapshot_download(model, revision=revision or None, allow_patterns=WEIGHT_PATTERNS,
                                  ignore_patterns=["original/*", "consolidated*"]))
    return path, path.name


def _accelerator_available() -> bool:
    import torch

    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return bool(torch.cuda.is_available())


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def quantize_llmcompressor(model: Any, tokenizer: Any, ids: list[list[int]], args: argparse.Namespace,
                           ev: Events) -> dict[str, Any]:
    """Run AWQ + W4A16 group quantization in place on ``model`` (llmcompressor's sequential
    pipeline: one decoder layer at a time, so a 12B model needs one layer's worth of GPU
    memory). Returns the quantization parameters for the metadata."""
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from llmcompressor import oneshot
    from llmcompressor.modifiers import Modifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    if not _accelerator_available():
        # llmcompressor pins cached activations to page-locked memory to speed up copies
        # to the GPU; without an accelerator torch refuses to pin, and there is nothing
        # to speed up, so pinning becomes a no-op (CPU runs: tests, small models).
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None  # type: ignore[method-assign]

    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    n_layers = int(getattr(model.config.get_text_config(), "num_hidden_layers", 0) or 0)

    class YapdProgress(Modifier):
        """Reports each decoder layer done; last in the recipe so AWQ and the
        quantization of the layer have run when it hears the epoch end."""

        done: int = 0
        started: float = 0.0

        def on_initialize(self, state: Any, **kwargs: Any) -> bool:
            return True

        def on_calibration_start(self, state: Any, event: Any, **kwargs: Any) -> None:
            self.started = time.monotonic()
            ev.progress("calibrating", f"layer 0/{n_layers}", layer=0, layers=n_layers, eta_s=None)

        def on_sequential_epoch_end(self, state: Any, event: Any, modules: Any = None, **kwargs: Any) -> None:
            names = {type(m).__name__ for m in modules or []}
            if not (names & layer_classes or any(n.endswith("DecoderLayer") for n in names)):
                return  # the embedding prefix or the head: not a layer
            self.done += 1
            spent = time.monotonic() - self.started
            eta = spent / self.done * max(n_layers - self.done, 0) if n_layers else None
            ev.progress("calibrating", f"layer {self.done}/{n_layers}, ETA {fmt_duration(eta)}",
                        layer=self.done, layers=n_layers, eta_s=None if eta is None else round(eta, 1))

    weights = {"num_bits": args.bits, "type": "int", "symmetric": False, "strategy": "group",
               "group_size": args.group_size}
    ignore = ["lm_head"]
    recipe = [
        AWQModifier(duo_scaling=True),
        QuantizationModifier(ignore=ignore, config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}),
        YapdProgress(),
    ]
    # An explicit fingerprint: datasets would otherwise hash the Arrow table with dill,
    # which fails on some pyarrow/Python pairs (seen on the H100 image, Python 3.12:
    # "Can't pickle <class 'MonthDayNano'>").
    table = InMemoryTable.from_pydict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    ds = Dataset(table, fingerprint=hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16])
    oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=recipe, max_seq_length=args.max_len,
            num_calibration_samples=len(ids), shuffle_calibration_samples=False, pipeline="sequential")
    return {"scheme": "W4A16", "bits": args.bits, "group_size": args.group_size, "symmetric": False,
            "zero_point": True, "strategy": "group", "targets": ["Linear"], "ignore": ignore,
            "duo_scaling": True, "format": "pack-quantized", "quant_method": "compressed-tensors"}


def _drop_progress_from_recipe(out: Path) -> None:
    """llmcompressor saves the recipe it ran; ours has YapdProgress, a class nobody else
    can load, so it is taken out of the saved copy."""
    path = out / "recipe.yaml"
    if not path.exists():
        return
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "YapdProgress"}
        return node

    path.write_text(yaml.safe_dump(strip(data), sort_keys=False), encoding="utf-8")


def model_card(meta: dict[str, Any]) -> str:
    src = meta["source"]
    q = meta["quantization"]
    cal = meta["calibration"]
    lib = meta["library"]
    hub_id = src["model"] if not Path(src["model"]).expanduser().exists() and "/" in src["model"] else None
    front = ["---", "library_name: transformers", "tags:", "- awq", "- w4a16", "- compressed-tensors",
             "- llmcompressor", "- yapd"]
    if hub_id:
        front += [f"base_model: {hub_id}", "base_model_relation: quantized"]
    front.append("---")
    rev = src.get("revision") or "(local directory)"
    return "\n".join([
        *front, "",
        f"# {Path(src['model']).name} AWQ W4A16",
        "",
        f"4-bit AWQ (activation-aware weight quantization) of `{src['model']}` at revision `{rev}`, "
        f"made by yapd with {lib['name']} {lib['version']}: int{q['bits']} weights in groups of "
        f"{q['group_size']} with zero points, 16-bit activations; `{', '.join(q['ignore'])}` kept in full precision.",
        "",
        "The checkpoint is in compressed-tensors `pack-quantized` format; vLLM reads the scheme from "
        "`config.json` (no `quantization=` argument) and runs it on its Marlin W4A16 kernels:",
        "",
        "```", "vllm serve <this repo or directory>", "```",
        "",
        "## Calibration",
        "",
        f"{cal['samples']} samples ({cal['tokens']} tokens, at most {cal['max_seq_len']} each) from "
        f"`{cal['source']}`"
        + (", short spoken conversations written for yapd and rendered with the model's chat template"
           if cal["source"].startswith("builtin:") else "") + ".",
        "",
        "## Provenance",
        "",
        "| | |", "| --- | --- |",
        f"| source | `{src['model']}` |",
        f"| revision | `{rev}` |",
        f"| method | AWQ, {q['scheme']}, group size {q['group_size']}, duo scaling |",
        f"| library | {lib['name']} {lib['version']}, compressed-tensors {lib.get('compressed_tensors')}, "
        f"transformers {lib.get('transformers')}, torch {lib.get('torch')} |",
        f"| created | {meta['created']} |",
        "",
        f"Full details: `{METADATA_FILE}`.",
        "",
    ])


def _copy_tokenizer(src: Path, dst: Path, tokenizer: Any) -> None:
    copied = False
    for name in TOKENIZER_FILES:
        f = src / name
        if f.is_file():
            shutil.copy2(f, dst / name)
            copied = True
    if not copied:
        tokenizer.save_pretrained(dst)


def run(args: argparse.Namespace, ev: Events) -> tuple[int, dict[str, Any]]:
    from yapd.awq import calibration

    # Chosen before torch is imported: llmcompressor works on the first visible device.
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif args.device.startswith("cuda:"):
        index = int(args.device.split(":", 1)[1])
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)
    token = os.environ.get("HF_TOKEN", "")
    if args.push_repo:
        from yapd.awq.push import check

        check(args.role, args.push_repo, token)
    out = Path(args.out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cleanup(out)
    tmp = tmp_path(out)
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()

    ev.progress("loading", f"loading {args.model}")
    import torch
    from transformers import AutoModelForCausalLM

    from yapd.engines.tokenizer import load_tokenizer

    torch.manual_seed(0)
    src, revision = resolve_source(args.model, args.revision)
    tokenizer = load_tokenizer(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto")
    model.eval()

    cal = calibration.load(args.role, tokenizer, args.samples, args.calibration_file)
    ids = calibration.tokenize(cal.samples, tokenizer, args.max_len)
    if not ids:
        raise AwqError("no calibration sample has two or more tokens")
    ev.progress("loading", f"{len(ids)} calibration samples, {sum(map(len, ids))} tokens")

    quant = quantize_llmcompressor(model, tokenizer, ids, args, ev)

    ev.progress("saving", f"writing {out.name}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        model.save_pretrained(str(tmp), save_compressed=True)
        _drop_progress_from_recipe(tmp)
        _copy_tokenizer(src, tmp, tokenizer)
        config_sha = hashlib.sha256((src / "config.json").read_bytes()).hexdigest()
        meta: dict[str, Any] = {
            "format_version": METADATA_VERSION,
            "role": args.role,
            "source": {"model": args.model, "revision": revision, "config_sha256": config_sha},
            "method": "awq",
            "library": {"name": "llmcompressor", "version": _version("llmcompressor"),
                        "compressed_tensors": _version("compressed-tensors"), "transformers": _version("transformers"),
                        "torch": _version("torch"), "yapd": __version__},
            "quantization": quant,
            "calibration": {"source": cal.source, "sha256": cal.sha256, "samples": len(ids),
                            "tokens": sum(map(len, ids)), "max_seq_len": args.max_len},
            "device": "cuda" if _accelerator_available() else "cpu",
            "created": started.isoformat(timespec="seconds"),
            "duration_s": round(time.monotonic() - t0, 1),
        }
        (tmp / "README.md").write_text(model_card(meta), encoding="utf-8")
        # The metadata is the last file written: an entry without it is never loaded.
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        delay = float(os.environ.get("YAPD_DEBUG_AWQ_COMMIT_DELAY_S") or 0)
        if delay:  # test hook: a window in which to kill the job with everything but the rename done
            ev.progress("committing", f"about to rename into {out}")
            time.sleep(delay)
        commit(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result: dict[str, Any] = {"path": str(out), "metadata": meta, "push": None}
    if args.push_repo:
        from yapd.awq.push import PushSettings, push

        ev.progress("pushing", f"uploading to {args.push_repo}@{args.push_branch}")
        settings = PushSettings(repo=args.push_repo, token=token, branch=args.push_branch,
                                private=args.push_private, allow_create=args.push_allow_create,
                                commit_message=args.push_commit_message, endpoint=args.hub_endpoint)
        try:
            result["push"] = push(out, settings)
        except AwqError as exc:
            result["push_error"] = str(exc)
            return EXIT_PUSH_FAILED, result
    return EXIT_OK, result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.out:
        if not args.cache_dir:
            build_parser().error("--out or --cache-dir is required")
        from yapd.awq import cache_path

        args.out = str(cache_path(Path(args.cache_dir), args.model, args.revision))
    if args.samples < 1 or args.max_len < 16:
        build_parser().error("--samples must be >= 1 and --max-len >= 16")
    _die_with_parent()
    # SIGTERM (yapd stopping, or the operator) unwinds like an exception, so the
    # temporary directory is removed; SIGKILL leaves it for the next job to sweep.
    signal.signal(signal.SIGTERM, _on_sigterm)
    ev = Events(args.role)
    token = os.environ.get("HF_TOKEN", "")
    try:
        code, result = run(args, ev)
    except AwqError as exc:
        ev.send("error", error=scrub(str(exc), token))
        return EXIT_USAGE if isinstance(exc, AwqSettingsError) else EXIT_FAILED
    except Exception as exc:
        import traceback

        sys.stderr.write(scrub(traceback.format_exc(), token))
        ev.send("error", error=scrub(f"{type(exc).__name__}: {exc}", token))
        return EXIT_FAILED
    ev.send("result", ok=code == EXIT_OK, **result)
    return code


if __name__ == "__main__":
    sys.exit(main())
