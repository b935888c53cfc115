"""``python -m peft_graft_cli``: the ``peft-graft`` command."""

from . import main

raise SystemExit(main())
