"""`python -m overture` (also `accelerate launch -m overture ...`).

On a multi-process launch (WORLD_SIZE > 1) the process ends through
``overture.launch.run_main``: process group destroyed, output flushed, ``os._exit`` with
the command's exit code, which avoids the C++ abort seen at interpreter exit after DDP
runs.
"""

from overture.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
