"""Every command's entry point: `@entry("ppo")` on a stage's or tool's `main(cfg)`.

    python -m stages.ppo train.kl_coef=0.1      # Hydra composes conf/ppo.yaml, then main(cfg) runs
    python -m stages.ppo --help                  # the command's docstring, then every config key with its help

It is `hydra.main` over conf/<name>.yaml, plus what every entry point owes the user: the composed config validated
before anything runs (every bad value reported at once, pipeline.core.config.problems), errors a user can cause as
one line and exit code 2 (`friendly`), and `--help` that prints the config's fields with their help text rather
than Hydra's generic page (`--hydra-help` still shows that one).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "conf"


def entry(config_name: str):
    def decorate(fn):
        import hydra

        from pipeline.core.config import validate  # importing it registers the structured configs
        from pipeline.core.errors import UserError, friendly

        @functools.wraps(fn)
        def checked(cfg):
            from pipeline.core.dist import allow_fsdp_on_cpu, stacks_on_sigusr1
            from pipeline.core.stage import failures_recorded

            allow_fsdp_on_cpu()
            stacks_on_sigusr1()

            validate(cfg)
            with failures_recorded():  # the one place a stage's failure is recorded and its tracker closed
                return fn(cfg)

        composed = hydra.main(config_path=str(CONF), config_name=config_name, version_base="1.3")(friendly(checked))

        @functools.wraps(fn)
        def main():
            if any(a in ("--help", "-h") for a in sys.argv[1:]):
                from pipeline.core.config import describe

                doc = sys.modules[fn.__module__].__doc__ or ""
                try:
                    print(
                        doc.strip() + "\n\nConfig (conf/" + config_name + ".yaml; override any key as key=value):"
                        "\n\n" + describe(config_name)
                    )
                except BrokenPipeError:  # `--help | head`
                    sys.stderr.close()
                return
            try:
                check_overrides(config_name, sys.argv[1:])
            except UserError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                sys.exit(2)
            composed()

        main.run = fn  # the body without Hydra, for tests and library use
        return main

    return decorate


_FLAGS_WITH_VALUE = {
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--info",
    "-i",
    "--experimental-rerun",
}


def overrides_of(argv: list[str]) -> list[str]:
    """The key=value overrides of a command line, Hydra's own flags left out."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = a in _FLAGS_WITH_VALUE
        elif "=" in a:
            out.append(a)
    return out


def check_overrides(config_name: str, argv: list[str]) -> None:
    """Every override names a key of the config (or a config group), with or without Hydra's `+`/`++`/`~`: a typo
    is one line naming the key and the closest valid one, not Hydra's seven-line message, and `+optim.lrr=1` is
    refused rather than added and ignored. Without -m the config is also composed once here, so that a bad value
    (a word for a number, a group option that does not exist) is one line too."""
    import difflib

    from hydra import compose, initialize_config_dir

    from pipeline.core.config import SCHEMAS, fields_help
    from pipeline.core.errors import UserError

    overrides = overrides_of(argv)
    keys = set(fields_help(SCHEMAS[config_name]))
    keys |= {k.rsplit(".", i)[0] for k in list(keys) for i in range(1, k.count(".") + 1)}  # groups of fields
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in keys or key in groups or key.split(".")[0] == "hydra" or key.split("/")[0] in groups:
            continue
        close = difflib.get_close_matches(key, sorted(keys | groups), n=1, cutoff=0.6)
        raise UserError(
            f"unknown config key '{key}' in '{o}'"
            + (f"; did you mean {close[0]}?" if close else "")
            + f" (python -m {_module_for(config_name)} --help lists every key)"
        )
    if any(a in ("-m", "--multirun") for a in argv):
        return  # sweep values are Hydra's to expand
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except Exception as e:  # noqa: BLE001 — Hydra's composition errors, whatever their class
        text = "\n".join(dict.fromkeys(str(x) for x in (e, e.__cause__) if x is not None))
        text = text.split("Config search path:")[0]
        lines = [
            ln.strip()
            for ln in text.splitlines()
            if ln.strip()
            and not ln.strip().startswith(("full_key", "object_type", "reference_type", "Set the environment variable"))
        ]
        msg = "; ".join(lines).replace(":;", ":").replace("\t", " ")
        if "Available options" in msg:  # "...options in 'preset': cpu; gpu1; gpu8" -> "cpu, gpu1, gpu8"
            head, _, opts = msg.partition("Available options")
            msg = head + "available options" + opts.replace("; ", ", ")
        raise UserError(f"the config does not compose: {msg}") from None


def _module_for(config_name: str) -> str:
    from pipeline.core.registry import SPECS

    return f"stages.{config_name}" if config_name in SPECS else f"stages.tools.{config_name}"
