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
        from pipeline.core.errors import friendly

        @functools.wraps(fn)
        def checked(cfg):
            validate(cfg)
            return fn(cfg)

        composed = hydra.main(config_path=str(CONF), config_name=config_name, version_base="1.3")(friendly(checked))

        @functools.wraps(fn)
        def main():
            if any(a in ("--help", "-h") for a in sys.argv[1:]):
                from pipeline.core.config import describe

                doc = sys.modules[fn.__module__].__doc__ or ""
                try:
                    print(doc.strip() + "\n\nConfig (conf/" + config_name + ".yaml; override any key as key=value):"
                          "\n\n" + describe(config_name))
                except BrokenPipeError:  # `--help | head`
                    sys.stderr.close()
                return
            composed()

        main.run = fn  # the body without Hydra, for tests and library use
        return main

    return decorate
