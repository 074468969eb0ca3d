"""Runs soda-mega commands in one process (one Megatron import for many cases).

Usage: python untrusted_worker.py CASES.json RESULTS.json; each case is {"argv": [...]}; each
result is {"rc": int, "stderr": str}. Unexpected exceptions count as rc 1 with the traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback


def main() -> None:
    from soda_mega.cli import main as cli

    cases = json.loads(open(sys.argv[1]).read())
    results = []
    for case in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = cli(case["argv"])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported to the test, which names the case
                traceback.print_exc()
                rc = 1
        results.append({"rc": rc, "stderr": err.getvalue()})
        try:
            from soda_mega.parallel import state

            state.shutdown()
        except Exception:  # noqa: BLE001 - nothing was initialised
            pass
    open(sys.argv[2], "w").write(json.dumps(results))


if __name__ == "__main__":
    main()
