"""The ``peft-graft`` command line."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Sequence

from .errors import ExportError, GraftError


def _bands(text: str) -> list[tuple[int | None, int]]:
    """Parse ``16:8,112:4,rest:2`` into precision bands."""
    bands = []
    for part in text.split(","):
        count, _, bits = part.partition(":")
        if not bits:
            raise argparse.ArgumentTypeError(f"band {part!r} is not n_directions:bits (use 'rest' for the rest)")
        bands.append((None if count.strip() in ("rest", "*") else int(count), int(bits)))
    return bands


def build_parser() -> argparse.ArgumentParser:
    from .extraction.options import ExtractionOptions
    from .serving.upstreams import ENGINES
    from .transfer import TransferConfig

    parser = argparse.ArgumentParser(prog="peft-graft", description="GraftLLM SkillPacks for Hugging Face PEFT.")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    commands = parser.add_subparsers(dest="command", required=True)

    extract = commands.add_parser("extract", help="compress a fine-tune's delta against its base into a SkillPack")
    extract.add_argument("--base", required=True, help="base model: local folder or Hub repo id")
    extract.add_argument("--finetuned", required=True, help="fine-tuned model: local folder or Hub repo id")
    extract.add_argument("--output", required=True, help="pack folder to create")
    extract.add_argument("--calibration", help=".jsonl ({'text': ...} per line) or .txt (one text per line) for GPTQ")
    extract.add_argument("--attn-rank", type=int, help="rank of attention projections (GraftConfig.r)")
    extract.add_argument("--mlp-energy", type=float, help="energy kept by MLP projections (GraftConfig.mlp_energy)")
    extract.add_argument("--embed-density", type=float, help="kept fraction of embedding deltas")
    extract.add_argument("--bands", type=_bands, help="precision bands, e.g. 16:8,112:4,rest:2")
    extract.add_argument("--group-size", type=int)
    _add_settings_flags(extract, ExtractionOptions)

    inspect = commands.add_parser("inspect", help="print a pack's per-module table")
    inspect.add_argument("pack", help="pack folder")

    push = commands.add_parser("push", help="upload a pack or router folder to the Hub, with its model card")
    push.add_argument("folder", help="pack folder, or router folder (with its router_config.json)")
    push.add_argument("repo_id", help="Hub repo, e.g. org/llama-math-skillpack")
    push.add_argument("--revision", help="branch to commit to (created if missing)")
    push.add_argument("--tag", help="tag the new commit, e.g. v1")
    push.add_argument("--private", action="store_true", default=None)
    push.add_argument("--message", help="commit message")
    push.add_argument("--token")

    export = commands.add_parser(
        "export", help="write packs for other engines: a PEFT LoRA adapter, vLLM's LoRA set, or a GGUF LoRA"
    )
    export.add_argument(
        "--to",
        choices=["lora", "vllm", "gguf"],
        default="lora",
        help="lora: one PEFT LoRA folder; vllm: a LoRA folder per pack plus the vllm and gateway commands; gguf: a "
        "llama.cpp / Ollama LoRA file",
    )
    export.add_argument("pack", nargs="+", help="pack folder (vllm: several, or one router folder)")
    export.add_argument("output", help="folder (lora, vllm) or .gguf file to create")
    export.add_argument("--base", help="base model folder: with --merged-base, merge the deltas LoRA cannot hold")
    export.add_argument("--merged-base", help="where to save the base with those deltas merged in")
    export.add_argument(
        "--merged-dtype", choices=["bfloat16", "float16", "float32"], help="merged base dtype (default: the base's)"
    )
    export.add_argument("--overwrite", action="store_true")

    evaluate = commands.add_parser("eval", help="compare base, fine-tune and packs on the same prompts / texts")
    evaluate.add_argument("--base", required=True, help="base model folder")
    evaluate.add_argument("--finetuned", help="full fine-tune folder (for retention)")
    evaluate.add_argument("--pack", action="append", default=[], help="pack folder (repeatable)")
    evaluate.add_argument("--task", help="reasoning-gym task to score by exact match, e.g. basic_arithmetic")
    evaluate.add_argument(
        "--task-options", type=json.loads, default={}, help='task options as JSON, e.g. {"max_digits": 1}'
    )
    evaluate.add_argument("--n", type=int, default=100, help="held-out questions")
    evaluate.add_argument(
        "--exclude-train",
        type=int,
        default=0,
        help="skip the first N questions of --seed (the fine-tune's training set)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the question stream")
    evaluate.add_argument(
        "--texts", help="held-out texts for perplexity: .jsonl ({'text': ...}) or .txt (one per line)"
    )
    evaluate.add_argument("--max-new-tokens", type=int, default=16)
    evaluate.add_argument("--json", help="also write the comparison as JSON here")
    evaluate.add_argument("--record", action="store_true", help="store each pack's scores in its model card")

    transfer = commands.add_parser(
        "transfer", help="teach a target a source model's skill (source answers, trl SFT, optional DPO), then pack it"
    )
    transfer.add_argument("--source", required=True, help="model folder, Hub id, bundled name, or 'reference'")
    transfer.add_argument("--target", required=True, help="model folder, Hub id or bundled name (never modified)")
    transfer.add_argument("--task", required=True, help="reasoning-gym task, e.g. letter_counting")
    transfer.add_argument("--task-options", type=json.loads, default={}, help="task options as JSON")
    transfer.add_argument("--work-dir", required=True, help="stage outputs; running again resumes from them")
    _add_settings_flags(transfer, TransferConfig)

    merge = commands.add_parser(
        "merge", help="add several packs' combined deltas into one static model (sum, mean or TIES), no router"
    )
    merge.add_argument("output", help="merged model folder to create")
    merge.add_argument("--base", required=True, help="base model folder")
    merge.add_argument("--pack", action="append", required=True, help="pack folder (repeatable)")
    merge.add_argument("--method", choices=["sum", "mean", "ties"], default="ties")
    merge.add_argument("--weight", type=float, action="append", help="scale of each pack's delta (repeatable)")
    merge.add_argument("--density", type=float, default=0.2, help="TIES: fraction of each delta's entries kept")
    merge.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: the base's")
    merge.add_argument("--overwrite", action="store_true")

    serve = commands.add_parser(
        "serve", help="serve packs through an OpenAI-compatible API (model: a pack, the base, or 'auto' to route)"
    )
    serve.add_argument("router", nargs="?", help="router folder (its packs, and 'auto' routes with its classifier)")
    serve.add_argument("--base", help="base model folder or Hub id (default: the one the router folder records)")
    serve.add_argument("--pack", action="append", default=[], help="NAME=FOLDER, instead of a router (repeatable)")
    serve.add_argument("--base-name", help="the model name that selects the base alone (default: its folder name)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    serve.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get HTTP 429")
    serve.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a request")
    serve.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is cut off")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--upstream", help="gateway mode: route, then forward to this OpenAI-compatible engine's URL")
    serve.add_argument(
        "--engine",
        choices=list(ENGINES),
        default="vllm",
        help="how the upstream selects an adapter (gateway mode)",
    )
    serve.add_argument("--upstream-model", help="the upstream's name for the base (default: --base-name)")
    serve.add_argument(
        "--upstream-adapter",
        action="append",
        default=[],
        help="PACK=NAME: the pack's adapter name upstream (default: the pack's name; llama.cpp: its --lora index)",
    )

    pull = commands.add_parser("pull", help="download a pack or router from the Hub into a folder")
    pull.add_argument("repo_id")
    pull.add_argument("folder", help="where to put it")
    pull.add_argument("--revision", help="branch, tag or commit")
    pull.add_argument("--token")
    return parser


def _add_settings_flags(parser: argparse.ArgumentParser, settings: type) -> None:
    """One ``--flag`` per field of a settings dataclass, with its default and help (its ``metadata["help"]``)."""
    import types
    import typing
    from dataclasses import fields

    hints = typing.get_type_hints(settings)
    for item in fields(settings):
        flag = "--" + item.name.replace("_", "-")
        help_text = f"{item.metadata.get('help', '')} (default: {item.default})"
        if isinstance(item.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=item.default, help=help_text)
            continue
        hint = hints[item.name]
        choices = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kind = next(choice for choice in choices if choice is not type(None))
        optional = type(None) in choices
        parse = _optional(kind) if optional else kind
        parser.add_argument(flag, type=parse, default=item.default, help=help_text)


def _optional(kind: type):
    """A flag parser for an optional value: 'none' gives None."""

    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handlers = {
            "extract": _extract,
            "inspect": _inspect,
            "push": _push,
            "pull": _pull,
            "export": _export,
            "eval": _evaluate,
            "transfer": _transfer,
            "merge": _merge,
            "serve": _serve,
        }
        handler = handlers[args.command]
        return handler(args)
    except (GraftError, OSError) as error:
        if args.debug:
            raise
        print(f"peft-graft: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("peft-graft: interrupted", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    """The error as one line, with what to do where the OS refused a write (no space, read-only, no permission)."""
    text = " ".join(str(error).split())
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENOTDIR):
        text += " (check that the output folder's disk is writable and has room; --debug shows where)"
    return text


def _extract(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .config import GraftConfig
    from .extraction import ExtractionOptions, extract_skillpack

    overrides = {
        "r": args.attn_rank,
        "mlp_energy": args.mlp_energy,
        "embed_density": args.embed_density,
        "precision_bands": args.bands,
        "group_size": args.group_size,
    }
    config = GraftConfig(**{key: value for key, value in overrides.items() if value is not None})
    options = ExtractionOptions(**{item.name: getattr(args, item.name) for item in fields(ExtractionOptions)})
    report = extract_skillpack(args.base, args.finetuned, args.output, config, options, calibration=args.calibration)
    print(report.table())
    print(f"wrote {args.output}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .extraction import ExtractionReport

    print(ExtractionReport.load(args.pack).table())
    return 0


def _push(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .hub import push_pack
    from .routing import push_router_folder
    from .routing.config import ROUTER_CONFIG

    push = push_router_folder if (Path(args.folder) / ROUTER_CONFIG).is_file() else push_pack
    commit = push(
        args.folder,
        args.repo_id,
        revision=args.revision,
        tag=args.tag,
        private=args.private,
        token=args.token,
        commit_message=args.message,
    )
    print(f"pushed {args.folder} to {args.repo_id} (commit {commit}{f', tag {args.tag}' if args.tag else ''})")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from .hub import pull_pack
    from .routing import pull_router
    from .routing.config import ROUTER_CONFIG

    if _has_file(args.repo_id, ROUTER_CONFIG, args.revision, args.token):
        folder = pull_router(args.repo_id, args.folder, revision=args.revision, token=args.token)
    else:
        folder = pull_pack(args.repo_id, args.folder, revision=args.revision, token=args.token)
    print(f"pulled {args.repo_id} into {folder}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .ops import export_gguf, export_lora, export_vllm

    if args.to != "vllm" and len(args.pack) != 1:
        print(f"peft-graft: error: --to {args.to} exports one pack (got {len(args.pack)})", file=sys.stderr)
        return 2
    if args.to == "vllm":
        if args.merged_base:
            print("peft-graft: error: --to vllm writes the merged base itself: give --base only", file=sys.stderr)
            return 2
        router, packs = _packs_of(args.pack)
        report = export_vllm(packs, args.output, base=args.base, router=router, overwrite=args.overwrite)
        print(report.summary())
        return 0
    if args.to == "gguf":
        report = export_gguf(args.pack[0], args.output, base=args.base, overwrite=args.overwrite)
        print(report.summary())
        return 0
    if (args.base is None) != (args.merged_base is None):
        print("peft-graft: error: --base and --merged-base go together", file=sys.stderr)
        return 2
    import torch

    report = export_lora(
        args.pack[0],
        args.output,
        base=args.base,
        merged_base_dir=args.merged_base,
        merged_dtype=getattr(torch, args.merged_dtype) if args.merged_dtype else None,
        overwrite=args.overwrite,
    )
    print(report.summary())
    return 0


def _packs_of(inputs: list[str]):
    """A router folder's packs by name (and the folder), or pack folders named after themselves."""
    from pathlib import Path

    from .routing import RouterConfig
    from .routing.config import ROUTER_CONFIG

    if len(inputs) == 1 and (Path(inputs[0]) / ROUTER_CONFIG).is_file():
        root = Path(inputs[0])
        sources = RouterConfig.read(root).sources(root)
        if not all(source.is_local for source in sources.values()):
            raise ExportError("the router references Hub packs: pull it with its packs first (peft-graft pull)")
        return str(root), {name: source.location for name, source in sources.items()}
    return None, {Path(folder).name: folder for folder in inputs}


def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation import compare, record_in_pack
    from .evaluation.tasks import ReasoningTask
    from .extraction.calibration import load_texts

    if not args.task and not args.texts:
        print("peft-graft: error: give --task and/or --texts", file=sys.stderr)
        return 2

    def base_model():
        return AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()

    models = {"base": base_model()}
    if args.finetuned:
        models["finetuned"] = AutoModelForCausalLM.from_pretrained(args.finetuned, dtype=torch.float32).eval()
    packs = {Path(pack).name: pack for pack in args.pack}
    for name, pack in packs.items():
        models[name] = PeftModel.from_pretrained(base_model(), pack).eval()
    task = ReasoningTask(args.task, **args.task_options) if args.task else None
    examples = task.split(args.exclude_train, args.n, seed=args.seed)[1] if task else ()
    texts = load_texts(args.texts, what="held-out text") if args.texts else ()
    comparison = compare(
        models,
        AutoTokenizer.from_pretrained(args.base),
        task=task,
        examples=examples,
        texts=texts,
        max_new_tokens=args.max_new_tokens,
    )
    print(comparison.table())
    if args.json:
        setup = {"task": task.name if task else None, "task_options": task.dataset_options if task else None}
        setup.update(questions=[example.question for example in examples], texts=len(texts))
        report = {**setup, **comparison.to_dict()}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.record:
        for name, pack in packs.items():
            record_in_pack(pack, comparison, name, args.task or "held-out text")
    return 0


def _transfer(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from ._demo.bundled import BUNDLED_MODELS, bundled_model
    from .evaluation.tasks import ReasoningTask
    from .transfer import TransferConfig, transfer

    def resolve(model: str) -> str:
        """A bundled model's name (e.g. gemma3-270m) as its converted folder; folders and Hub ids as given."""
        return str(bundled_model(model)) if model in BUNDLED_MODELS else model

    config = TransferConfig(**{item.name: getattr(args, item.name) for item in fields(TransferConfig)})
    task = ReasoningTask(args.task, **args.task_options)
    result = transfer(resolve(args.source), resolve(args.target), task, args.work_dir, config)
    print(json.dumps(result.to_dict(), indent=2))
    return 0


def _merge(args: argparse.Namespace) -> int:
    import torch

    from .ops import merge_packs

    folder = merge_packs(
        args.base,
        args.pack,
        args.output,
        method=args.method,
        weights=args.weight,
        density=args.density,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        overwrite=args.overwrite,
    )
    print(f"merged {len(args.pack)} pack(s) into {folder} ({args.method})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serving.launch import load_server, run

    pairs = {}
    for flag, items in (("--pack", args.pack), ("--upstream-adapter", args.upstream_adapter)):
        pairs[flag] = {}
        for item in items:
            name, separator, value = item.partition("=")
            if not separator or not name or not value:
                print(f"peft-graft: error: {flag} {item!r} is not NAME=VALUE", file=sys.stderr)
                return 2
            pairs[flag][name] = value
    app = load_server(
        args.base,
        router=args.router,
        packs=pairs["--pack"],
        base_name=args.base_name,
        device=args.device,
        dtype=args.dtype,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        default_max_tokens=args.max_tokens,
        request_timeout=args.request_timeout,
        upstream=args.upstream,
        engine=args.engine,
        upstream_model=args.upstream_model,
        adapters=pairs["--upstream-adapter"] or None,
    )
    run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _has_file(repo_id: str, filename: str, revision: str | None, token: str | None) -> bool:
    from huggingface_hub import file_exists

    from .hub import hub_errors

    with hub_errors("reach", repo_id, revision):
        return file_exists(repo_id, filename, revision=revision, token=token)


if __name__ == "__main__":
    raise SystemExit(main())
