"""The application: the ``towerstream`` command and what drives the whole pipeline.

It sits above the four component packages (``serving -> indexer -> learners -> streams``)
and is the only code that knows all of them: the CLI entry point (:mod:`app.cli`, which
mounts each package's ``_*_cli`` module), the demo orchestration (:mod:`app.demo`), its
report (:mod:`app.report`), what both share about a run (:mod:`app.samples`) and the
benchmark driver (:mod:`app.bench`). Nothing below imports it (an import-linter layers
contract in ``pyproject.toml`` holds that).
"""
