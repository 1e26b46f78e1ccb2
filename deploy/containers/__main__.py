"""``python -m deploy.containers COMMAND``: the container engine and images the container suite uses.

  setup        install Podman and its companions from Debian's packages where missing (root)
  images       build the base, the stand-ins, Docker Compose and the product's images (cached)
  start|stop   the Docker API service on .cache/containers/podman.sock, and the health-check loop
  env          the variables that point Docker clients at it, as shell lines
  run -- CMD   run CMD with the engine up and those variables set; stop the engine after if it started it
"""

from __future__ import annotations

import argparse
import logging
import sys

from deploy.containers import engine, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.containers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("setup", "images", "start", "stop", "env", "run", "health-loop"))
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="run: the command (after --)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="containers: %(message)s")
    try:
        if args.command == "setup":
            engine.setup()
        elif args.command == "images":
            engine.setup()
            images.build_all()
        elif args.command == "start":
            engine.start()
        elif args.command == "stop":
            engine.stop()
        elif args.command == "env":
            for name, value in engine.engine_env().items():
                print(f"export {name}={value}")
        elif args.command == "health-loop":
            engine.health_loop()
        else:
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                parser.error("run needs a command after --")
            return engine.run_with_engine(cmd)
    except engine.EngineError as err:
        print(f"containers: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
