"""Several prefcli commands run one after another in every process of one torchrun launch,
as `torchrun -m prefcli ARGS` would run each (prefcli.cli.main). Not a test file itself.

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/cli_script.py COMMANDS.json OUT_DIR

COMMANDS.json is a list of argument lists. Each rank writes OUT_DIR/rank<R>.json: per command
its exit code and what it printed on stdout and stderr. (A launch costs seconds of start-up;
the tests run sixteen commands under it.)
"""

import contextlib
import io
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import torch

    from prefcli import distributed
    from prefcli.cli import main as prefcli

    # One process group for all the commands: torchrun's rendezvous serves one, and joining
    # again after leaving it would wait forever. Left once, at the end.
    leave, distributed.destroy_distributed = distributed.destroy_distributed, lambda: None
    torch.set_num_threads(1)
    commands = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    results = []
    for argv in commands:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                prefcli(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        results.append({"argv": argv, "code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()})
        (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(results, indent=1))
    leave()


if __name__ == "__main__":
    main()
