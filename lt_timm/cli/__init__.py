"""The command line of lt-timm, in one place: every flag, the ``-c`` reader, timm parity, the checks, resolve-once.

* :mod:`~lt_timm.cli.flags` — flags defined once (LossTransform's, the launcher's, the timm options train and validate
  share);
* :mod:`~lt_timm.cli.recipe` — the one ``-c`` YAML reader (``train.py`` and ``train_detection.py``);
* :mod:`~lt_timm.cli.parity` — every timm option, supported or refused and why (:mod:`~lt_timm.cli.parity_doc`
  writes ``docs/parity.md``; :mod:`~lt_timm.cli.timm_options` is timm's option list);
* :mod:`~lt_timm.cli.checks` — the argument checks argparse cannot make;
* :mod:`~lt_timm.cli.train`, :mod:`~lt_timm.cli.validate`, :mod:`~lt_timm.cli.detection` — each script's parser,
  ``parse_args`` and the one ``resolve`` step after it: every change to the parsed ``Namespace`` happens there, and
  what goes below is a typed config (:mod:`lt_timm.config`).

The submodules are imported where needed (not here), so ``train_detection.py --help`` stays light.
"""
