"""`oasst train`, `oasst merge`, `oasst generate`, `oasst chat`: thin Click commands over the oasst_train library.

Only click, the standard library and oasst_tools are imported here; torch and friends load inside the commands,
so `oasst --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from oasst_model.flags import NON_NEGATIVE, NonNegative, Option, load_options, take_aliases, verbose_option
from oasst_tools.cli.params import FolderPath, argument_or_option, switch
from oasst_tools.errors import OasstError
from oasst_train.config import FIELDS, TrainConfig, field_choices, field_type

# Former spellings, hidden from --help, still accepted for one release (the loading options' own are in
# oasst_model.spec.OPTIONS).
ALIASES = {"learning_rate": ("--lr",)}
# Given explicitly (with a metavar or a short help) instead of generated.
HANDWRITTEN = {"model", "data", "out"}
# Defaults that read better in words than as the empty value they are.
SHOWN = {"target_modules": "empty (QLoRA's choice)", "init_adapter": "none"}
METAVARS = {"init_adapter": "DIR"}


def _config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One flag per TrainConfig field, named after it; default None so that only flags actually given override the
    recipe, while --help shows the field's default."""
    from oasst_model.flags import AUTO_INT, option, shown
    from oasst_model.spec import OPTIONS

    for f in reversed(dataclasses.fields(TrainConfig)):
        if f.name in HANDWRITTEN:
            continue
        kind = field_type(f.name)
        aliases = ALIASES.get(f.name, ()) + (OPTIONS[f.name].aliases if f.name in OPTIONS else ())
        if kind is int and f.default == "auto":
            kind = AUTO_INT
        fn = option(f.name, help=f.metadata["help"], default=SHOWN.get(f.name, shown(f.default)),
                    kind=kind if kind is not tuple else str, choices=field_choices(f.name),
                    metavar="A,B,..." if kind is tuple else METAVARS.get(f.name), aliases=aliases)(fn)
    return fn


@click.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="YAML recipe (train/recipes/*.yaml); flags override its values.")
@click.option("--model", default=None, metavar="PATH_OR_HUB_ID", help=FIELDS["model"].metadata["help"])
@click.option("--data", default=None, metavar="PATH_OR_HUB_ID", help=FIELDS["data"].metadata["help"])
@click.option("--out", default=None, metavar="DIR", help=FIELDS["out"].metadata["help"])
@switch("--resume", help="Continue the run in --out from its last complete checkpoint.")
@switch("--quiet", "-q", help="No progress bar, config or summary table.")
@switch("--dry-run",
        help="Load the tokenizer only, print the data report and one example with its loss mask; write nothing.")
@verbose_option
@_config_options
def train(config_file: Path | None, resume: bool, quiet: bool, dry_run: bool, verbose: bool, **flags: Any) -> None:
    """Train a QLoRA adapter on a conversation dataset (Guanaco text or chat-template messages), or with --method
    dpo on the preference pairs of `oasst build --pairs` (from a fresh adapter, or --init-adapter an SFT one).

    \b
        oasst train --config train/recipes/tiny-cpu.yaml --data fixtures/guanaco-en --out runs/tiny
        oasst train --config train/recipes/tiny-cpu-dpo.yaml --data data/pairs --init-adapter runs/tiny \\
                    --out runs/tiny-dpo
        oasst train --config train/recipes/tiny-cpu.yaml --data fixtures/guanaco-en --out runs/tiny --resume
        oasst train --config train/recipes/tiny-cpu.yaml --data fixtures/guanaco-en --dry-run
        oasst train --model ../shared/models/stories260K --data fixtures/guanaco-en --no-load-in-4bit \\
                    --max-steps 60 --out runs/stories
        accelerate launch --config_file train/recipes/accelerate-2gpu.yaml -m oasst_tools train \\
                    --config train/recipes/falcon-7b-guanaco.yaml --data data/guanaco --out runs/falcon

    Writes the adapter (safetensors), tokenizer, model card (README.md), train_config.yaml, train_summary.json and
    loss.png (and dpo.png: reward accuracy and margin) to --out, and resumable checkpoints (each with its card) to
    --out/checkpoints. SIGTERM or Ctrl-C saves a checkpoint at the end of the current step and exits 1; the same
    command with --resume continues from it.
    --report-to tensorboard writes its event files to --out/runs (tensorboard --logdir runs/tiny/runs).
    """
    from rich.console import Console
    from rich.pretty import Pretty
    from rich.text import Text

    from oasst_train.config import to_dict
    from oasst_train.report import check_report_to, summary_table, tensorboard_dir

    if dry_run:
        _quiet_libraries(verbose)
        _dry_run(config_file, resume, flags)
        return
    console = Console(stderr=True, quiet=quiet)
    cfg, origins = _resolved(config_file, flags, console)
    if not resume:  # a new run writes train_config.yaml into --out: never over the recipe it reads
        from oasst_tools.output import check_apart

        check_apart(cfg.out, [("--config", config_file)])
    check_report_to(cfg.report_to)

    def announce(resolved: TrainConfig, lines: list[str]) -> None:
        # Text and Pretty, not a markup string: paths and values may hold `[/]` or `[bold]`.
        head = Text.assemble(("oasst train", "bold"), " --resume" if resume else "")
        if verbose:
            console.print(Text.assemble(head, " config:"), Pretty(to_dict(resolved)))
        else:
            # One line: the whole config is in OUT/train_config.yaml, and -v prints it.
            console.print(Text.assemble(head, f" {resolved.model} on {resolved.data} -> {resolved.out} (config: "
                                              f"{Path(resolved.out) / 'train_config.yaml'})"), soft_wrap=True)
        for line in lines:
            console.print(line, markup=False, highlight=False)

    _quiet_libraries(verbose)
    from oasst_train.trainer import run_training

    out = Path(cfg.out)
    try:
        with tensorboard_dir(out / "runs"):
            summary = run_training(cfg, resume=resume, console=console, progress=not quiet, announce=announce,
                                       origins=origins)
    except BaseException as exc:
        failure = _train_failure(exc, out)
        if failure is None:
            raise
        raise failure from None
    if not quiet:
        Console().print(summary_table(summary, f"oasst train -> {cfg.out}"))


def _resolved(config_file: Path | None, flags: dict[str, Any], console: Any,
              required: tuple[str, ...] | None = None) -> tuple[TrainConfig, dict[str, str]]:
    """The run's config (defaults < recipe < flags) and where each given setting was set; one line on `console`
    for each flag that changed a value of the recipe."""
    from oasst_train.config import PATH_FIELDS, REQUIRED, flag_name, resolve_config

    flags = take_aliases(flags)
    for name in PATH_FIELDS:
        # `--init-adapter "$SFT"` with SFT unset would quietly train against the bare base: an empty path typed on
        # the command line is a mistake, not "leave it out" (in a recipe, '' is the setting's default).
        if isinstance(flags.get(name), str) and not flags[name].strip():
            raise OasstError(f"{flag_name(name)}: {name} is empty: give a path, or leave the flag out")
    notes: list[str] = []
    origins: dict[str, str] = {}
    cfg = resolve_config(config_file, flags, REQUIRED if required is None else required, notes=notes,
                         origins=origins)
    for line in notes:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return cfg, origins


def _dry_run(config_file: Path | None, resume: bool, flags: dict[str, Any]) -> None:
    """`oasst train --dry-run`: the data report and one example on stdout; --out is neither needed nor touched."""
    from rich.console import Console

    from oasst_train.config import REQUIRED

    cfg, origins = _resolved(config_file, flags, Console(stderr=True), tuple(n for n in REQUIRED if n != "out"))
    if resume:
        from oasst_train.report import warn

        warn("--resume does nothing with --dry-run")
    from oasst_train.preview import dry_run

    dry_run(cfg, Console(), origins)


def _train_failure(exc: BaseException, out: Path) -> OasstError | None:
    """A failed write as one line (None: re-raise `exc` as it is); run_training already removed an `out` it made
    when no complete checkpoint is there, and says where the checkpoints are kept otherwise."""
    from oasst_train.checkpoints import last_complete_checkpoint
    from oasst_tools.files import write_failure

    reason = write_failure(exc)
    if reason is None or os.environ.get("OASST_DEBUG", "") not in ("", "0"):
        return None
    kept = last_complete_checkpoint(out) if _is_dir(out) else None
    filename = getattr(exc, "filename", None)
    # Writers that name no file (safetensors, torch.save, a full disk on an open file) were writing the run.
    said = f"{os.fsdecode(filename)}: {reason}" if filename is not None else f"--out {out}: {reason} (writing the run)"
    resume = f"; checkpoints kept in {kept.parent}, continue with --resume" if kept is not None else ""
    return OasstError(said + resume)


def _adapter_argument(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The adapter folder of merge, generate and chat: `ADAPTER`, or `--adapter DIR` as `oasst eval` takes it."""
    return argument_or_option("adapter", "DIR", "the folder `oasst train` wrote", kind=click.Path(path_type=Path),
                              cls=Option, show_default="ADAPTER",
                              help="The adapter folder, as `oasst eval --adapter` takes it (instead of ADAPTER).")(fn)


@click.command()
@_adapter_argument
@click.option("--out", type=FolderPath(), required=True, help="Folder for the merged model.")
@load_options(inference=True, skip=("compute_dtype",))
@click.option("--compute-dtype", "compute_dtype", cls=Option, type=click.Choice(["auto", "bfloat16", "float16",
              "float32"]), default=None, show_default="as trained, else auto",
              help="dtype of the merged model's weights (the dtype it computes in when loaded).")
@click.option("--dtype", "alias__compute_dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
              default=None, hidden=True)
@click.option("--tolerance", type=NonNegative(infinite=True), default=None, cls=Option,
              show_default="0.001 x the largest |logit|, at least 0.001",
              help="Max allowed |merged - (base + adapter)| logit difference; inf: no check.")
@verbose_option
def merge(adapter: Path, out: Path, tolerance: float | None, verbose: bool, **flags: Any) -> None:
    """Merge a LoRA adapter into a copy of its base model (in --compute-dtype), and check the merged logits.

    The base is dequantized exactly as it was during training (when trained in 4-bit), so the merged model is
    the one the adapter learned against. Loading options left out are read from the adapter's train_config.yaml.

    \b
        oasst merge runs/stories --out runs/stories-merged
    """
    from rich.console import Console

    _quiet_libraries(verbose)
    from oasst_train.merge import merge_adapter

    result = merge_adapter(adapter, out, tolerance=tolerance, **take_aliases(flags))
    # markup=False: the paths are the user's and may hold `[/]`.
    Console().print(f"merged {adapter} into {out} ({result['dtype']}, {result['parameters']:,} parameters); "
                    f"max logit difference vs base + adapter: {result['max_logit_diff']:.2e} "
                    f"(tolerance {result['tolerance']:.2e}); after rounding to {result['dtype']}: "
                    f"{result['max_logit_diff_saved']:.2e}", markup=False, highlight=False)


def _format_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--format of generate and chat: train's flag of the same name, defaulting to what the adapter recorded."""
    from oasst_tools.conversation import FORMATS

    return click.option("--format", "format_", type=click.Choice(FORMATS), default=None, cls=Option,
                        show_default="as trained, else guanaco",
                        help="Conversation format of the prompts: guanaco or chat-template (the tokenizer's); auto: "
                             "chat-template when the tokenizer has one.")(fn)


def _cudnn_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--cudnn-attention of generate and chat: eval's and train's setting of the same name, off here (every new
    token is a new key length, a new cuDNN plan)."""
    from oasst_model.attention import CUDNN_ATTENTION_HELP

    return click.option("--cudnn-attention/--no-cudnn-attention", "cudnn_attention", default=False, cls=Option,
                        show_default="off", help=CUDNN_ATTENTION_HELP)(fn)


def _sampling_options(*, stop: str, temperature: float) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--max-new-tokens, --temperature and --seed of generate and chat (`stop`: the first one's help)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        # train's seed range (numpy's and torch's seeds are unsigned 32-bit)
        fn = click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
                          help="Seed for sampling.")(fn)
        fn = click.option("--temperature", type=NON_NEGATIVE, default=temperature, show_default=True,
                          help="Sampling temperature; 0: greedy decoding.")(fn)
        return click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
                            help=stop)(fn)

    return decorate


@click.command()
@_adapter_argument
@click.option("--prompt", required=True, help="The human turn; wrapped as `### Human: PROMPT### Assistant:` in the "
                                              "Guanaco format, by the chat template otherwise.")
@_format_option
@load_options(inference=True)
@_sampling_options(stop="Stop after this many new tokens.", temperature=0.0)
@_cudnn_option
@verbose_option
def generate(adapter: Path, prompt: str, format_: str | None, max_new_tokens: int, temperature: float, seed: int,
             cudnn_attention: bool, verbose: bool, **flags: Any) -> None:
    """Answer one prompt with a trained adapter, streaming tokens; stops at EOS or where the model starts the next
    human turn (Guanaco) or ends its own (chat templates).

    The format and the loading options left out are read from the adapter's train_config.yaml (4-bit stays 4-bit).

    \b
        oasst generate runs/stories --prompt "Tell me a story about a cat."
    """
    import sys

    if sys.stdout is None:  # started with file descriptor 1 closed (`>&-`): the reply would be lost, exit 0
        raise OasstError("stdout is closed: generate writes the reply there (redirect it to a file instead)")
    _quiet_libraries(verbose)
    from oasst_train.generate import Chatbot

    bot = Chatbot.load(adapter, seed=seed, format=format_, cudnn_attention=cudnn_attention, **take_aliases(flags))
    answer = bot.reply(prompt, max_new_tokens=max_new_tokens, temperature=temperature, stream=click.echo)
    click.echo(f"[stopped: {answer.stop}, {answer.new_tokens} tokens]", err=True)


@click.command()
@_adapter_argument
@_format_option
@load_options(inference=True)
@_sampling_options(stop="Stop each reply after this many new tokens.", temperature=0.7)
@_cudnn_option
@verbose_option
def chat(adapter: Path, format_: str | None, max_new_tokens: int, temperature: float, seed: int,
         cudnn_attention: bool, verbose: bool, **flags: Any) -> None:
    """Chat with a trained adapter in the format it was trained in; the conversation so far is the context.

    An empty line or Ctrl-D ends the chat. The format and the loading options left out are read from the adapter's
    train_config.yaml.

    \b
        oasst chat runs/stories
    """
    import sys

    if sys.stdin is None:  # started with file descriptor 0 closed (`<&-`): Python has no stdin to read turns from
        raise OasstError("stdin is closed: chat reads your turns from it (pipe them in, or use oasst generate)")
    if sys.stdout is None:  # `>&-`: every reply would be lost
        raise OasstError("stdout is closed: chat writes its replies there (redirect it to a file instead)")
    _quiet_libraries(verbose)
    from oasst_train.generate import Chatbot

    bot = Chatbot.load(adapter, seed=seed, format=format_, cudnn_attention=cudnn_attention, **take_aliases(flags))
    while True:
        try:
            prompt = click.prompt(click.style("you", bold=True), default="", show_default=False)
        except (EOFError, click.Abort):
            break
        if not prompt.strip():
            break
        click.echo(click.style("bot", bold=True) + ":", nl=False)
        bot.reply(prompt, max_new_tokens=max_new_tokens, temperature=temperature, stream=click.echo, keep=True)


def _is_dir(path: Path) -> bool:
    """Path.is_dir that answers False where the name itself is unusable (too long, a loop of links)."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _quiet_libraries(verbose: bool = False) -> None:
    """Library output that does not concern the user silenced until the command returns (oasst_model.quiet);
    `verbose` (-v) keeps all of it. Training data never reaches transformers' too-long-text warning: rows are
    tokenized with verbose=False and cut to --max-length, which the data report counts."""
    from oasst_model.quiet import for_command

    for_command(verbose)

