"""The commands of ``peft-graft``, each built when chosen (see :data:`peft_graft_cli.COMMANDS`).

Each function returns a :class:`click.Command`; `peft_graft` itself is imported inside the command bodies (and, for
the flags generated from a settings dataclass, when the command is built), never at module level.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from . import output

DTYPES = ["bfloat16", "float16", "float32"]


# ----- flags from settings dataclasses --------------------------------------------------------------------------------


def _settings_options(settings: type):
    """One ``--flag`` per field of a settings dataclass (ExtractionOptions, TransferConfig), with its default and
    its ``metadata["help"]``: the API and the CLI describe each setting in one place."""
    hints = typing.get_type_hints(settings)

    def decorate(command):
        for item in reversed(fields(settings)):
            flag = "--" + item.name.replace("_", "-")
            help_text = item.metadata.get("help", "")
            if isinstance(item.default, bool):
                command = click.option(f"{flag}/--no-{flag[2:]}", item.name, default=item.default, help=help_text)(
                    command
                )
                continue
            hint = hints[item.name]
            choices = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
            kind = next(choice for choice in choices if choice is not type(None))
            optional = type(None) in choices
            command = click.option(
                flag,
                item.name,
                type=_Optional(kind) if optional else kind,
                default=item.default,
                show_default=item.default is not None,
                help=help_text + (" ('none' for none)" if optional and item.default is not None else ""),
            )(command)
        return command

    return decorate


class _Optional(click.ParamType):
    """A flag type for an optional value: 'none' gives None."""

    def __init__(self, kind: type) -> None:
        self.kind, self.name = kind, kind.__name__

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        try:
            return self.kind(value)
        except ValueError:
            self.fail(f"{value!r} is not a valid {self.name}", param, ctx)


def _settings_values(settings: type, values: dict[str, Any]) -> dict[str, Any]:
    return {item.name: values[item.name] for item in fields(settings) if item.name in values}


def _bands(text: str | None) -> list[tuple[int | None, int]] | None:
    """Parse ``16:8,112:4,rest:2`` into precision bands."""
    if text is None:
        return None
    bands = []
    for part in text.split(","):
        count, _, bits = part.partition(":")
        try:
            bands.append((None if count.strip() in ("rest", "*") else int(count), int(bits)))
        except ValueError:
            raise click.BadParameter(
                f"band {part!r} is not DIRECTIONS:BITS (use 'rest' for the rest), e.g. 16:8,112:4,rest:2",
                param_hint="--bands",
            ) from None
    return bands


def _pairs(flag: str, items: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, separator, value = item.partition("=")
        if not separator or not name or not value:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint=flag)
        pairs[name] = value
    return pairs


def _settings() -> Any:
    return click.get_current_context().find_root().obj


# ----- extract --------------------------------------------------------------------------------------------------------


_POLICY_FLAGS = {"attn_rank": "--attn-rank", "mlp_energy": "--mlp-energy", "embed_density": "--embed-density"}


def extract() -> click.Command:
    from peft_graft.extraction.options import ExtractionOptions

    @click.command(name="extract")
    @click.option("--base", required=True, help="Base model: local folder or Hub repo id.")
    @click.option("--finetuned", required=True, help="Fine-tuned model: local folder or Hub repo id.")
    @click.option("--output", required=True, help="Pack folder to create.")
    @click.option("--calibration", help="Texts for GPTQ: .jsonl ({'text': ...} per line) or .txt (one per line).")
    @click.option("--attn-rank", type=int, help="Rank of attention projections (not with --budget).")
    @click.option("--mlp-energy", type=float, help="Energy kept by MLP projections (not with --budget).")
    @click.option("--embed-density", type=float, help="Kept fraction of embedding deltas (not with --budget).")
    @click.option("--bands", help="Precision bands, e.g. 16:8,112:4,rest:2 (not with --budget).")
    @click.option("--group-size", type=int, help="Quantization group size.")
    @_settings_options(ExtractionOptions)
    def command(**values: Any) -> None:
        """Compress a fine-tune's delta against its base into a SkillPack folder.

        Either a fixed policy (--attn-rank, --mlp-energy, --embed-density, --bands) or a byte budget (--budget), which
        plans every module's form, rank and bits itself.
        """
        from peft_graft.config import GraftConfig
        from peft_graft.extraction import extract_skillpack

        policy = {
            "r": values["attn_rank"],
            "mlp_energy": values["mlp_energy"],
            "embed_density": values["embed_density"],
            "precision_bands": _bands(values["bands"]),
            "group_size": values["group_size"],
        }
        if values["budget"] is not None:
            given = [flag for name, flag in {**_POLICY_FLAGS, "bands": "--bands"}.items() if values[name] is not None]
            if given:
                raise click.UsageError(
                    f"--budget plans ranks and bits itself, so {' and '.join(given)} would be ignored: "
                    "give either --budget or the fixed policy flags"
                )
        config = GraftConfig(**{key: value for key, value in policy.items() if value is not None})
        settings = _settings_values(ExtractionOptions, values)
        settings["progress"] = settings["progress"] and not _settings().quiet
        options = ExtractionOptions(**settings)
        report = extract_skillpack(
            values["base"], values["finetuned"], values["output"], config, options, calibration=values["calibration"]
        )
        output.pack(output.summary(values["output"]), modules=False)
        stages = ", ".join(
            f"{name.replace('_', ' ')} {seconds:.1f} s" for name, seconds in report.stage_seconds.items()
        )
        output.note(
            f"wrote {values['output']} in {report.wall_seconds:.1f} s ({stages}); peak memory "
            f"{report.peak_rss_bytes / 2**20:.0f} MiB"
        )

    return command


# ----- inspect --------------------------------------------------------------------------------------------------------


def inspect() -> click.Command:
    @click.command(name="inspect")
    @click.argument("folder", type=click.Path(path_type=Path))
    @click.option("--modules", is_flag=True, help="List every module, not only the totals by role.")
    @click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
    def command(folder: Path, modules: bool, as_json: bool) -> None:
        """Show what a pack folder or a router folder holds.

        For a pack: its base, its size against the fp16 delta, and per role (or per form, for a pack trained as an
        adapter) the modules, forms, ranks, bits and bytes. For a router: its packs and how it routes.
        """
        summary = output.summary(folder)
        if as_json:
            output.json_out(summary)
        elif summary["kind"] == "router":
            output.router(summary)
        else:
            output.pack(summary, modules=modules)

    return command


# ----- eval -----------------------------------------------------------------------------------------------------------


def evaluate() -> click.Command:
    @click.command(name="eval")
    @click.option("--base", required=True, help="Base model folder or Hub id.")
    @click.option("--finetuned", help="The full fine-tune (folder or Hub id), for retention.")
    @click.option("--pack", "packs", multiple=True, help="Pack folder (repeatable).")
    @click.option("--task", help="A reasoning-gym task scored by exact match, e.g. basic_arithmetic.")
    @click.option("--task-options", default="{}", help='Task options as JSON, e.g. {"max_digits": 1}.')
    @click.option("--n", "count", type=int, default=100, show_default=True, help="Held-out questions.")
    @click.option(
        "--exclude-train", type=int, default=0, help="Skip the first N questions of --seed (the training set)."
    )
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of the question stream.")
    @click.option("--texts", help="Held-out texts for perplexity: .jsonl ({'text': ...}) or .txt (one per line).")
    @click.option("--max-new-tokens", type=int, default=16, show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON instead of a table.")
    @click.option("--output", "output_file", help="Also write the comparison as JSON to this file.")
    @click.option("--record", is_flag=True, help="Store each pack's scores in its model card.")
    def command(**values: Any) -> None:
        """Compare the base, the fine-tune and packs on the same held-out questions (exact match) and/or texts
        (perplexity; lower is better)."""
        from peft_graft.utils.extras import require_extra

        if not values["task"] and not values["texts"]:
            raise click.UsageError("give --task (questions scored by exact match) and/or --texts (perplexity)")
        packs = _by_folder_name(values["packs"], "each pack's row is named after its folder")
        if set(packs) & {"base", "finetuned"}:
            raise click.UsageError("a pack folder may not be named 'base' or 'finetuned' (those rows are reserved)")
        try:
            task_options = json.loads(values["task_options"])
        except ValueError as error:
            raise click.BadParameter(f"not JSON ({error})", param_hint="--task-options") from None
        require_extra("eval", "peft-graft eval")  # before any model loads
        _evaluate(values, packs, task_options)

    return command


def _evaluate(values: dict[str, Any], packs: dict[str, str], task_options: dict[str, Any]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_graft.evaluation import compare, record_in_pack
    from peft_graft.evaluation.tasks import ReasoningTask
    from peft_graft.extraction.calibration import load_texts

    task = ReasoningTask(values["task"], **task_options) if values["task"] else None
    examples = task.split(values["exclude_train"], values["count"], seed=values["seed"])[1] if task else ()
    texts = load_texts(values["texts"], what="held-out text") if values["texts"] else ()

    def base_model():
        return AutoModelForCausalLM.from_pretrained(values["base"], dtype=torch.float32).eval()

    models = {"base": base_model()}
    if values["finetuned"]:
        models["finetuned"] = AutoModelForCausalLM.from_pretrained(values["finetuned"], dtype=torch.float32).eval()
    for name, pack in packs.items():
        models[name] = PeftModel.from_pretrained(base_model(), pack).eval()
    comparison = compare(
        models,
        AutoTokenizer.from_pretrained(values["base"]),
        task=task,
        examples=examples,
        texts=texts,
        max_new_tokens=values["max_new_tokens"],
    )
    setup = {"task": task.name if task else None, "task_options": task.dataset_options if task else None}
    setup.update(questions=[example.question for example in examples], texts=len(texts))
    report = {**setup, **comparison.to_dict()}
    if values["as_json"]:
        output.json_out(report)
    else:
        output.result(comparison.table())
    if values["output_file"]:
        from peft_graft.utils.atomic import write_file

        write_file(values["output_file"], json.dumps(report, indent=2) + "\n")
    if values["record"]:
        for name, pack in packs.items():
            record_in_pack(pack, comparison, name, values["task"] or "held-out text")


# ----- the Hub --------------------------------------------------------------------------------------------------------


def push() -> click.Command:
    @click.command(name="push")
    @click.argument("folder")
    @click.argument("repo_id")
    @click.option("--revision", help="Branch to commit to (created if missing).")
    @click.option("--tag", help="Tag the new commit, e.g. v1 (refused before any upload if it exists).")
    @click.option("--private/--public", default=None, help="Visibility of a repo created by this push.")
    @click.option("--message", help="Commit message.")
    @click.option("--description", help="Commit description.")
    @click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
    @click.option("--token", help="Hub token (default: the logged-in one).")
    def command(folder, repo_id, revision, tag, private, message, description, create_pr, token) -> None:
        """Upload a pack folder, or a router folder with its packs, to the Hub repo REPO_ID, with its model card."""
        from peft_graft.hub import push_pack
        from peft_graft.routing import push_router_folder
        from peft_graft.routing.config import ROUTER_CONFIG

        push = push_router_folder if (Path(folder) / ROUTER_CONFIG).is_file() else push_pack
        commit = push(
            folder,
            repo_id,
            revision=revision,
            tag=tag,
            private=private,
            token=token,
            commit_message=message,
            commit_description=description,
            create_pr=create_pr,
        )
        output.result(f"pushed {folder} to {repo_id} (commit {commit}{f', tag {tag}' if tag else ''})")

    return command


def pull() -> click.Command:
    @click.command(name="pull")
    @click.argument("repo_id")
    @click.argument("folder")
    @click.option("--revision", help="Branch, tag or commit.")
    @click.option("--token", help="Hub token (default: the logged-in one).")
    def command(repo_id, folder, revision, token) -> None:
        """Download the pack or router (with its packs) of Hub repo REPO_ID into FOLDER."""
        from huggingface_hub import file_exists

        from peft_graft.hub import hub_errors, pull_pack
        from peft_graft.routing import pull_router
        from peft_graft.routing.config import ROUTER_CONFIG

        with hub_errors("reach", repo_id, revision):
            is_router = file_exists(repo_id, ROUTER_CONFIG, revision=revision, token=token)
        pull = pull_router if is_router else pull_pack
        pulled = pull(repo_id, folder, revision=revision, token=token)
        output.result(f"pulled {repo_id} into {pulled}")

    return command


# ----- export and merge -----------------------------------------------------------------------------------------------


def export() -> click.Command:
    @click.command(name="export")
    @click.option(
        "--to",
        "target",
        type=click.Choice(["lora", "vllm", "gguf"]),
        default="lora",
        show_default=True,
        help="lora: one PEFT LoRA folder; vllm: a LoRA folder per pack plus the vLLM and gateway commands; gguf: a "
        "llama.cpp / Ollama LoRA file.",
    )
    @click.argument("packs", nargs=-1, required=True)
    @click.argument("output_path", metavar="OUTPUT")
    @click.option("--base", help="Base model folder: with --merged-base, merge the deltas LoRA cannot hold.")
    @click.option("--merged-base", help="Where to save the base with those deltas merged in (--to lora).")
    @click.option("--merged-dtype", type=click.Choice(DTYPES), help="Merged base dtype (default: the base's).")
    @click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
    def command(target, packs, output_path, base, merged_base, merged_dtype, overwrite) -> None:
        """Write PACKS (one pack; for vllm, several or one router folder) in another engine's format at OUTPUT."""
        if target != "vllm" and len(packs) != 1:
            raise click.UsageError(f"--to {target} exports one pack (got {len(packs)})")
        if target == "vllm":
            if merged_base:
                raise click.UsageError("--to vllm writes the merged base itself: give --base only")
            from peft_graft.ops import export_vllm

            router, named = _packs_of(packs)
            report = export_vllm(named, output_path, base=base, router=router, overwrite=overwrite)
        elif target == "gguf":
            from peft_graft.ops import export_gguf

            report = export_gguf(packs[0], output_path, base=base, overwrite=overwrite)
        else:
            if (base is None) != (merged_base is None):
                raise click.UsageError("--base and --merged-base go together")
            import torch

            from peft_graft.ops import export_lora

            report = export_lora(
                packs[0],
                output_path,
                base=base,
                merged_base_dir=merged_base,
                merged_dtype=getattr(torch, merged_dtype) if merged_dtype else None,
                overwrite=overwrite,
            )
        output.result(report.summary())

    return command


def _packs_of(inputs: tuple[str, ...]) -> tuple[str | None, dict[str, str]]:
    """A router folder's packs by name (and the folder), or pack folders named after themselves."""
    from peft_graft.errors import ExportError
    from peft_graft.routing import RouterConfig
    from peft_graft.routing.config import ROUTER_CONFIG

    if len(inputs) == 1 and (Path(inputs[0]) / ROUTER_CONFIG).is_file():
        root = Path(inputs[0])
        sources = RouterConfig.read(root).sources(root)
        if not all(source.is_local for source in sources.values()):
            raise ExportError("the router references Hub packs: pull it with its packs first (peft-graft pull)")
        return str(root), {name: source.location for name, source in sources.items()}
    return None, _by_folder_name(inputs, "each is served under its folder's name")


def _by_folder_name(folders: tuple[str, ...], named: str) -> dict[str, str]:
    """Pack folders by the name of their folder (`named` says what the name is used for); two with one name are
    refused."""
    names = [Path(folder).name for folder in folders]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise click.UsageError(
            f"two packs share the folder name {', '.join(repeated)}: {named}, so give them distinct folder names"
        )
    return dict(zip(names, folders, strict=True))


def merge() -> click.Command:
    @click.command(name="merge")
    @click.argument("output_path", metavar="OUTPUT")
    @click.option("--base", required=True, help="Base model folder.")
    @click.option("--pack", "packs", multiple=True, required=True, help="Pack folder (repeatable).")
    @click.option("--method", type=click.Choice(["sum", "mean", "ties"]), default="ties", show_default=True)
    @click.option("--weight", "weights", type=float, multiple=True, help="Scale of each pack's delta (repeatable).")
    @click.option("--density", type=float, default=0.2, show_default=True, help="TIES: kept fraction of each delta.")
    @click.option("--dtype", type=click.Choice(DTYPES), help="Merged model dtype (default: the base's).")
    @click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
    def command(output_path, base, packs, method, weights, density, dtype, overwrite) -> None:
        """Add several packs' combined deltas into one static model at OUTPUT (no router)."""
        import torch

        from peft_graft.ops import merge_packs

        folder = merge_packs(
            base,
            list(packs),
            output_path,
            method=method,
            weights=list(weights) or None,
            density=density,
            dtype=getattr(torch, dtype) if dtype else None,
            overwrite=overwrite,
        )
        output.result(f"merged {len(packs)} pack(s) into {folder} ({method})")

    return command


# ----- transfer -------------------------------------------------------------------------------------------------------


def transfer() -> click.Command:
    from peft_graft.transfer import TransferConfig

    @click.command(name="transfer")
    @click.option("--source", required=True, help="Model folder, Hub id, bundled name, or 'reference'.")
    @click.option("--target", required=True, help="Model folder, Hub id or bundled name (never modified).")
    @click.option("--task", required=True, help="A reasoning-gym task, e.g. letter_counting.")
    @click.option("--task-options", default="{}", help="Task options as JSON.")
    @click.option("--work-dir", required=True, help="Stage outputs; running again resumes from them.")
    @_settings_options(TransferConfig)
    def command(**values: Any) -> None:
        """Teach TARGET the skill SOURCE has on TASK (SOURCE's answers, trl SFT, optional DPO), then pack it."""
        from peft_graft._demo.bundled import BUNDLED_MODELS, bundled_model
        from peft_graft.evaluation.tasks import ReasoningTask
        from peft_graft.transfer import transfer as run_transfer
        from peft_graft.utils.extras import require_extra

        require_extra("trl", "peft-graft transfer")

        def resolve(model: str) -> str:
            """A bundled model's name (e.g. gemma3-270m) as its converted folder; folders and Hub ids as given."""
            return str(bundled_model(model)) if model in BUNDLED_MODELS else model

        try:
            task_options = json.loads(values["task_options"])
        except ValueError as error:
            raise click.BadParameter(f"not JSON ({error})", param_hint="--task-options") from None
        config = TransferConfig(**_settings_values(TransferConfig, values))
        task = ReasoningTask(values["task"], **task_options)
        result = run_transfer(resolve(values["source"]), resolve(values["target"]), task, values["work_dir"], config)
        output.json_out(result.to_dict())

    return command


# ----- serve ----------------------------------------------------------------------------------------------------------


def serve() -> click.Command:
    from peft_graft.serving.upstreams import ENGINES

    @click.command(name="serve")
    @click.argument("router", required=False)
    @click.option("--base", help="Base model folder or Hub id (default: the one the router folder records).")
    @click.option("--pack", "packs", multiple=True, help="NAME=FOLDER, instead of a router (repeatable).")
    @click.option("--base-name", help="The model name that selects the base alone (default: its folder name).")
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", type=int, default=8000, show_default=True)
    @click.option("--device", default="cpu", show_default=True, help="e.g. cpu, cuda, cuda:1.")
    @click.option(
        "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True
    )
    @click.option("--max-batch", type=int, default=16, show_default=True, help="Requests decoded together.")
    @click.option("--max-queue", type=int, default=64, show_default=True, help="Requests waiting; more get HTTP 429.")
    @click.option("--max-tokens", type=int, default=256, show_default=True, help="Default max_tokens of a request.")
    @click.option("--request-timeout", type=float, default=600.0, show_default=True, help="Seconds before a cut-off.")
    @click.option(
        "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
    )
    @click.option("--upstream", help="Gateway mode: route, then forward to this OpenAI-compatible engine's URL.")
    @click.option(
        "--engine",
        type=click.Choice(list(ENGINES)),
        default="vllm",
        show_default=True,
        help="How the upstream names adapters (gateway mode).",
    )
    @click.option("--upstream-model", help="The upstream's name for the base (default: --base-name).")
    @click.option(
        "--upstream-adapter",
        "upstream_adapters",
        multiple=True,
        help="PACK=NAME: the pack's adapter name upstream (default: the pack's name; llama.cpp: its --lora index).",
    )
    def command(**values: Any) -> None:
        """Serve a ROUTER folder's packs (or --pack NAME=FOLDER ...) through an OpenAI-compatible API: the model
        'auto' routes each request, a pack's name selects it, the base's name selects no pack."""
        from peft_graft.serving.launch import load_server, run
        from peft_graft.utils.extras import require_extra

        packs = _pairs("--pack", values["packs"])
        adapters = _pairs("--upstream-adapter", values["upstream_adapters"])
        require_extra("serve", "peft-graft serve")  # before the model loads
        app = load_server(
            values["base"],
            router=values["router"],
            packs=packs,
            base_name=values["base_name"],
            device=values["device"],
            dtype=values["dtype"],
            max_batch=values["max_batch"],
            max_queue=values["max_queue"],
            default_max_tokens=values["max_tokens"],
            request_timeout=values["request_timeout"],
            upstream=values["upstream"],
            engine=values["engine"],
            upstream_model=values["upstream_model"],
            adapters=adapters or None,
        )
        run(app, host=values["host"], port=values["port"], log_level=values["log_level"])

    return command
