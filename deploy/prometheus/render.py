"""Render a Prometheus configuration that scrapes workers at fixed addresses.

The compose stack uses ``prometheus.yml`` beside this file (Docker DNS discovery); a test or a
host without Docker renders the same job, ``fraud-worker``, with static targets and the same
alerting rules. JSON is valid YAML, so the output needs no YAML library.

>>> import json
>>> config = json.loads(render_config(["127.0.0.1:9108"], scrape_interval="1s"))
>>> config["scrape_configs"][0]["static_configs"][0]["targets"]
['127.0.0.1:9108']
>>> config["scrape_configs"][0]["job_name"]
'fraud-worker'
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules.yml"
COMPOSE_CONFIG = HERE / "prometheus.yml"
JOB = "fraud-worker"


def render_config(
    targets: Sequence[str],
    *,
    rules: Sequence[Path | str] = (RULES,),
    scrape_interval: str = "5s",
    evaluation_interval: str | None = None,
) -> str:
    """Prometheus YAML (as JSON) scraping ``targets`` as job ``fraud-worker``, loading ``rules``."""
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval or scrape_interval,
        },
        "rule_files": [str(Path(r).resolve()) for r in rules],
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": list(targets)}]},
        ],
    }
    return json.dumps(config, indent=2) + "\n"


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.prometheus.render", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", required=True, metavar="HOST:PORT",
                        help="a worker's metrics address (repeat for several)")
    parser.add_argument("--rules", action="append", default=None, help=f"rule file (default {RULES})")
    parser.add_argument("--scrape-interval", default="5s")
    parser.add_argument("--output", type=Path, default=None, help="file to write (default stdout)")
    args = parser.parse_args(argv)
    text = render_config(args.target, rules=args.rules or (RULES,), scrape_interval=args.scrape_interval)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(run())
