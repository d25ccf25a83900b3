"""`nla-cli`: the three verbs (collect, train, explain) plus eval, as a thin typer app.

Every option is a field of a config dataclass in nla/config.py: this file only turns fields
into flags, builds the config (which validates itself) and calls one function per verb.
NLAErrors print as one line and exit 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import typing

import typer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from nla import LAYER_CONVENTION  # noqa: E402
from nla.errors import NLAError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help=f"Natural Language Autoencoders on one GPU. Layer L = {LAYER_CONVENTION}.")


@app.callback()
def _group():
    """Keeps typer in multi-command mode (`nla-cli VERB ...`) whatever verbs are registered."""


def _check_env() -> None:
    """The kernel switches (NLA_KERNELS, NLA_NF4_TABLE) and the 0|1 ones (nla.switches) as
    one-line errors, before any work."""
    import kernels
    from nla import switches
    try:
        kernels.check_env()
    except ValueError as e:
        raise NLAError(str(e)) from None
    switches.check()


def _command(name: str, cfg_cls, run, doc: str):
    """Register a typer command whose parameters are the dataclass's fields."""
    hints = typing.get_type_hints(cfg_cls)
    params = []
    for f in dataclasses.fields(cfg_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.metadata.get("argument"):
            info = typer.Argument(default if default is not None else ..., help=f.metadata.get("help"))
        else:
            flag = "--" + f.name.replace("_", "-")
            if hints[f.name] is bool:  # every switch can be turned off too, e.g. against a preset
                flag = f"{flag}/--no-{flag[2:]}"
            info = typer.Option(default, flag, help=f.metadata.get("help"))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=hints[f.name]))

    takes_given = "given" in inspect.signature(cfg_cls).parameters
    params.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

    def cmd(ctx: typer.Context, **kwargs):
        if takes_given:  # what was typed beats a preset, even when it equals the default
            kwargs["given"] = tuple(k for k in kwargs if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE")
        try:
            _check_env()
            run(cfg_cls(**kwargs))
        except NLAError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)

    cmd.__signature__ = inspect.Signature(params)
    cmd.__doc__ = doc
    cmd.__name__ = name
    app.command(name)(cmd)


VERBS = (  # verb, module, config class, function, help
    ("collect", "nla.config", "CollectConfig", "nla.collect:collect",
     f"Activations of a model at a layer, from a text corpus, to shards on disk. Layer L = {LAYER_CONVENTION}."),
    ("train", "nla.config", "TrainConfig", "nla.train:train",
     "Warm start (summaries, AR SFT, AV SFT), then GRPO with the AR trained alongside."),
    ("explain", "nla.explain", "ExplainConfig", "nla.explain:explain",
     "Explain each chosen token's activation, with the AR's reconstruction score."),
    ("eval", "nla.evaluate", "EvalConfig", "nla.evaluate:evaluate",
     "FVE and cosine of an NLA against baselines, as markdown + JSON + PNG."),
)


def _register():
    import importlib
    for verb, mod, cls_name, target, doc in VERBS:
        try:
            cls = getattr(importlib.import_module(mod), cls_name)
        except (ImportError, AttributeError):
            continue  # a verb whose module is not there yet is simply not offered

        def run(cfg, target=target):
            m, f = target.split(":")
            getattr(importlib.import_module(m), f)(cfg)
        _command(verb, cls, run, doc)


_register()


def main():
    app()


if __name__ == "__main__":
    sys.exit(main())
