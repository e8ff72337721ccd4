"""Entry points: `python -m jobs.NAME --config FILE [--set k=v ...]`. Thin glue from a config to Ray.

The jobs are ENTRY_POINTS; the other modules here are their glue, which `python -m` would import and leave without a
word (exit status 0, nothing done): that is refused in one line naming the jobs.
"""

import sys

ENTRY_POINTS = ("finetune", "pretrain", "demo", "sweep", "analyze", "pack_data", "predict", "export")


def _refuse_a_library_module_run_as_a_job() -> None:
    """While `python -m jobs.X` imports this package, sys.argv[0] is "-m" and the module is in sys.orig_argv."""
    if sys.argv[:1] != ["-m"] or "-m" not in sys.orig_argv[:-1]:
        return
    module = sys.orig_argv[sys.orig_argv.index("-m") + 1]
    package, _, name = module.partition(".")
    if package == __name__ and name and name not in ENTRY_POINTS:
        print(f"error: {module} is not a job; the jobs: python -m jobs.{{{','.join(ENTRY_POINTS)}}}",
              file=sys.stderr)
        sys.exit(2)


_refuse_a_library_module_run_as_a_job()
