"""torchrun for the CLI's local launches: the same launcher, quieter when a rank fails.

`python -m nla_mcore.launchers.torchrun ARGS` is `python -m torch.distributed.run ARGS`, except
that when a rank exits non-zero it ends with one line saying which ranks failed and with which
exit code, instead of torchrun's own Python traceback: the rank has already printed why it
failed (`nla-mcore <verb>: error: ...`), and a launcher traceback under it only hides that.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as err:
        failed = sorted((rank, f.exitcode) for rank, f in err.failures.items())
        ranks = ", ".join(f"rank {rank} (exit code {code})" for rank, code in failed)
        print(f"nla-mcore: {ranks} failed; the lines above say why", file=sys.stderr)
        return next((code for _, code in failed if code > 0), 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
